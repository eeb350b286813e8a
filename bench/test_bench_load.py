"""Load benchmarks: each group has torch's loader beside ckptio's, and every loaded result is
checked against the original. Run with ``make bench-pytest``."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

import ckptio
from ckptio.benchmark._measure import touch
from ckptio.benchmark.candidates import verify, zeros_like_tree
from ckptio.benchmark.workloads import Workload

LOADERS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "torch.load": ("torch", torch.load),
    "ckptio.load": ("ckptio", ckptio.load),
}
MMAP_LOADERS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "torch.load(mmap=True)": ("torch", lambda p: torch.load(p, mmap=True)),
    "ckptio.load(mmap=True)": ("ckptio", lambda p: ckptio.load(p, mmap=True)),
}


def _run(benchmark: Any, fn: Callable[[], Any], workload: Workload) -> None:
    out = benchmark.pedantic(fn, rounds=5, warmup_rounds=1, iterations=1)
    verify(benchmark.name, out, workload.obj, workload.tied, ordered=True)


@pytest.mark.parametrize("name", list(LOADERS))
def test_load_touch(benchmark: Any, workload: Workload, files: dict, name: str) -> None:
    benchmark.group = f"load+touch {workload.name}"
    fmt, load = LOADERS[name]
    _run(benchmark, lambda: _touched(load(files[fmt])), workload)


@pytest.mark.parametrize("name", list(MMAP_LOADERS))
def test_mmap_load_touch(benchmark: Any, workload: Workload, files: dict, name: str) -> None:
    benchmark.group = f"mmap load+touch {workload.name}"
    fmt, load = MMAP_LOADERS[name]
    _run(benchmark, lambda: _touched(load(files[fmt])), workload)


@pytest.mark.parametrize("name", ["torch: load_state_dict(torch.load)", "ckptio.load_into"])
def test_reuse(benchmark: Any, workload: Workload, files: dict, name: str) -> None:
    """Loading into tensors that already exist (the torch way: load, then copy_ into them)."""
    benchmark.group = f"load into existing tensors {workload.name}"
    target = zeros_like_tree(workload.obj)
    if name.startswith("torch"):

        def fn() -> Any:
            _copy_into(target, torch.load(files["torch"]))
            return target

    else:

        def fn() -> Any:
            ckptio.load_into(target, files["ckptio"])
            return target

    _run(benchmark, fn, workload)


def _touched(obj: Any) -> Any:
    touch(obj)
    return obj


def _copy_into(dest: Any, src: Any) -> None:
    with torch.no_grad():
        if isinstance(dest, torch.Tensor):
            dest.copy_(src)
        elif isinstance(dest, dict):
            for k in dest:
                _copy_into(dest[k], src[k])
        elif isinstance(dest, (list, tuple)):
            for a, b in zip(dest, src, strict=True):
                _copy_into(a, b)
