"""Save benchmarks: torch.save beside ckptio.save; every file is loaded back and checked."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

import ckptio
from ckptio.benchmark.candidates import verify
from ckptio.benchmark.workloads import Workload

SAVERS: dict[str, Callable[[Any, str], None]] = {
    "torch.save": torch.save,
    "ckptio.save": ckptio.save,
}


@pytest.mark.parametrize("name", list(SAVERS))
def test_save(benchmark: Any, workload: Workload, files: dict, name: str) -> None:
    benchmark.group = f"save {workload.name}"
    path = str(files["dir"] / f"bench-{name}.pt")
    benchmark.pedantic(SAVERS[name], args=(workload.obj, path), rounds=5, warmup_rounds=1)
    verify(name, torch.load(path), workload.obj, workload.tied, ordered=True)
