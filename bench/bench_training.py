"""Training-loop costs of ckptio: what ``durable`` adds to a save, and how long
``async_save`` blocks the caller compared with a synchronous save.

Usage: ``python bench/bench_training.py [--rounds 5] [--dir /tmp/ckptio-bench]``

Workload: the GPT-2-medium fp16 state dict of bench/workloads.py (~710 MB). Candidates run
interleaved within each round (torch.save, ckptio.save, ckptio.save durable, async_save), so
a noisy machine disturbs them alike; the table reports medians over rounds. Each file is
checked against the state dict after the timings.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from typing import Callable

import torch

import ckptio
from ckptio.benchmark._measure import timed
from ckptio.benchmark.report import print_medians

from workloads import gpt2_medium_state_dict


def _fsync(path: str) -> None:
    for p, flags in ((path, os.O_RDONLY), (os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)):
        fd = os.open(p, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _seconds(fn: Callable[[], object]) -> float:
    return timed(fn)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default="/tmp/ckptio-bench-training")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    sd = gpt2_medium_state_dict()
    nbytes = sum(t.numel() * t.element_size() for k, t in sd.items() if k != "lm_head.weight")
    path = os.path.join(args.dir, "ckpt.pt")
    times: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)

    def write_async() -> None:
        blocked_start = time.perf_counter()
        future = ckptio.async_save(sd, path)
        blocked = time.perf_counter() - blocked_start
        future.result()
        record("async_save: caller blocked", blocked)
        record("async_save: until result()", time.perf_counter() - blocked_start)

    try:
        for r in range(args.rounds):
            record("torch.save", _seconds(lambda: torch.save(sd, path)))
            with ckptio.options(durable=False):
                record("ckptio.save durable=False", _seconds(lambda: ckptio.save(sd, path)))
            with ckptio.options(durable=True):
                record("ckptio.save durable=True", _seconds(lambda: ckptio.save(sd, path)))
            # durable's extra work, isolated from the noise of whole saves: the fsyncs of a
            # file that a durable=False save has just written, and of its directory.
            ckptio.save(sd, path)
            record("  fsync of file + directory", _seconds(lambda: _fsync(path)))
            write_async()
            print(f"round {r + 1}/{args.rounds} done", flush=True)
        loaded = ckptio.load(path)
        assert all(torch.equal(loaded[k], v) for k, v in sd.items()), "async file differs"
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)

    print(f"\nstate dict: {nbytes / 1e6:.0f} MB, {len(sd)} tensors, {args.rounds} rounds")
    print_medians(times)
    first_async = times["async_save: caller blocked"][0]
    print(f"(first async_save allocates its staging buffer: blocked {first_async:.3f} s)")


if __name__ == "__main__":
    main()
