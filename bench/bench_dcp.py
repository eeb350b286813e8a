"""torch.distributed.checkpoint storage: ckptio.dcp.Writer/Reader against the stock
FileSystemWriter/FileSystemReader, in one process, same run.

Usage: ``python bench/bench_dcp.py [--rounds 5] [--dir /tmp/ckptio-bench-dcp]``

Workload: the GPT-2-medium fp16 state dict of bench/workloads.py (~710 MB, 293 tensors; DCP
stores the tied lm_head twice) plus a few non-tensor entries. One process, no process group
(DCP's single-process mode). Both writers fsync (FileSystemWriter's sync_files=True default,
Writer's durable=True default). Loads go into a preallocated state dict, as a resume does.
Candidates alternate within each round; the table shows medians. Every load is checked
against the saved values.
"""

from __future__ import annotations

import argparse
import os
import shutil
import warnings
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

import ckptio.dcp
from ckptio.benchmark._measure import timed
from ckptio.benchmark.report import print_medians

from workloads import gpt2_medium_state_dict


def _seconds(fn: Callable[[], object]) -> float:
    return timed(fn)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default="/tmp/ckptio-bench-dcp")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    warnings.filterwarnings("ignore", message=".*overwriting since")
    state: dict[str, Any] = dict(gpt2_medium_state_dict())
    state["step"] = 1000
    state["config"] = {"lr": 3e-4, "betas": (0.9, 0.95), "name": "gpt2-medium"}
    nbytes = sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))

    writers: dict[str, Callable[[str], Any]] = {
        "stock FileSystemWriter": lambda p: FileSystemWriter(p),
        "stock FileSystemWriter threads=2": lambda p: FileSystemWriter(p, thread_count=2),
        "ckptio.dcp.Writer": lambda p: ckptio.dcp.Writer(p),
    }
    readers: dict[str, Callable[[str], Any]] = {
        "stock FileSystemReader": FileSystemReader,
        "ckptio.dcp.Reader": ckptio.dcp.Reader,
    }
    read_from = {
        "stock FileSystemReader": "stock FileSystemWriter",
        "ckptio.dcp.Reader": "ckptio.dcp.Writer",
    }
    paths = {name: os.path.join(args.dir, str(i)) for i, name in enumerate(writers)}
    times: dict[str, list[float]] = {}
    target = {k: torch.zeros_like(v) if torch.is_tensor(v) else None for k, v in state.items()}
    target["config"] = {"lr": 0.0, "betas": (0.0, 0.0), "name": ""}
    try:
        for r in range(args.rounds):
            for name, make in writers.items():
                shutil.rmtree(paths[name], ignore_errors=True)
                seconds = _seconds(
                    lambda m=make, p=paths[name]: dcp.save(state, storage_writer=m(p))
                )
                times.setdefault(f"save: {name}", []).append(seconds)
            for name, make in readers.items():
                for v in target.values():
                    if torch.is_tensor(v):
                        v.zero_()
                path = paths[read_from[name]]
                seconds = _seconds(lambda m=make, p=path: dcp.load(target, storage_reader=m(p)))
                times.setdefault(f"load: {name}", []).append(seconds)
                bad = [
                    k
                    for k, v in state.items()
                    if torch.is_tensor(v) and not torch.equal(v, target[k])
                ]
                assert not bad and target["config"] == state["config"], f"{name}: {bad[:3]}"
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    print(f"\nstate dict: {nbytes / 1e6:.0f} MB of tensors, {args.rounds} rounds, 1 process")
    print_medians(times)


if __name__ == "__main__":
    main()
