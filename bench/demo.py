"""The main job: save and load a GPT-2-medium fp16 state dict with ckptio and with torch.

    python bench/demo.py [--runs 5] [--dir /tmp]

Prints the median time of each operation over --runs rounds (after a warm-up round), the
candidates interleaved within each round, and checks every load against the original. The
headline is a load as an inference server pays it: the first load+touch of a fresh process
(each sample its own process, imports excluded, page cache warm); loads repeated in one process
follow as their own rows. Saves go to a path that does not exist yet; before each timed save a
throwaway file of ~1.2x the payload is written and deleted, because on these VMs the first
writes after idle run several times slower (freed memory goes back to the host), which would
otherwise penalise whichever candidate runs first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Callable

import torch

import ckptio
from ckptio.benchmark.candidates import CANDIDATES
from ckptio.benchmark.runner import first_loads, prime_writes
from ckptio.benchmark.workloads import gpt2_medium_state_dict


def _interleaved(
    candidates: dict[str, Callable[[], object]],
    runs: int,
    before: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Median seconds per candidate. Rounds interleave the candidates (rotating who goes
    first) so that all of them meet the same machine state: on these VMs the cost of fresh
    memory and of page-cache writes drifts by several times within a minute. Round 0 warms up
    and is not counted."""
    names = list(candidates)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(runs + 1):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            if before is not None:
                before(n)  # untimed
            t0 = time.perf_counter()
            out = candidates[n]()
            dt = time.perf_counter() - t0
            del out
            if r:
                times[n].append(dt)
    return {n: statistics.median(v) for n, v in times.items()}


def _check(loaded: dict, original: dict) -> None:
    assert loaded.keys() == original.keys()
    for k, v in original.items():
        assert torch.equal(loaded[k], v), k
    tied = loaded["lm_head.weight"].data_ptr() == loaded["transformer.wte.weight"].data_ptr()
    assert tied, "the tied embedding must stay tied"


def _touch(sd: dict) -> dict:
    for t in sd.values():  # read one byte of every page so lazy loads pay for their data
        if t.numel():
            t.view(-1).view(torch.uint8)[::4096].sum()
    return sd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--layers", type=int, default=24, help="24 = GPT-2 medium")
    args = ap.parse_args()

    print(f"building a GPT-2-medium-shaped fp16 state dict ({args.layers} layers)...")
    sd = gpt2_medium_state_dict(n_layer=args.layers)
    nbytes = sum(
        t.untyped_storage().nbytes()
        for t in {t.untyped_storage().data_ptr(): t for t in sd.values()}.values()
    )
    print(
        f"{len(sd)} tensors, {nbytes / 1e6:.0f} MB, torch {torch.__version__}, "
        f"ckptio {ckptio.__version__}, {ckptio.get_options().threads} I/O threads\n"
    )

    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        p_ck, p_th = os.path.join(d, "ckptio.pt"), os.path.join(d, "torch.pt")

        targets = {"torch.save": p_th, "ckptio.save": p_ck}

        def prime(name: str) -> None:  # a new path for every save, the same page-cache state
            if os.path.exists(targets[name]):
                os.unlink(targets[name])
            prime_writes(d, nbytes)

        saves = _interleaved(
            {
                "torch.save": lambda: torch.save(sd, p_th),
                "ckptio.save": lambda: ckptio.save(sd, p_ck),
            },
            args.runs,
            prime,
        )
        _check(torch.load(p_ck, weights_only=True), sd)
        _check(ckptio.load(p_th), sd)
        _check(ckptio.load(p_ck), sd)
        _check(ckptio.load(p_ck, mmap=True), sd)
        print(f"first loads: {args.runs} fresh processes per candidate...")
        files = {"torch": p_th, "ckptio": p_ck}
        names = ["torch", "ckptio", "ckptio, torch's file", "torch mmap", "ckptio mmap"]
        loaders = {n: (CANDIDATES[n], files[CANDIDATES[n].fmt]) for n in names}
        samples, _ = first_loads(loaders, None, args.runs, cold=False)
        first = {n: statistics.median(x["seconds"] for x in v) for n, v in samples.items()}
        loads = _interleaved(
            {
                "torch.load": lambda: _touch(torch.load(p_th, weights_only=True)),
                "ckptio.load": lambda: _touch(ckptio.load(p_ck)),
            },
            args.runs,
        )
        rows = [("save", n, t) for n, t in saves.items()]
        rows += [
            ("first load", f"{n} (fresh process)", t) for n, t in first.items() if "mmap" not in n
        ]
        rows += [("first mmap", f"{n} (fresh process)", t) for n, t in first.items() if "mmap" in n]
        rows += [("repeated", f"{n} (one process)", t) for n, t in loads.items()]
    base = {op: t for op, who, t in rows if who.startswith("torch")}
    print("| operation  | candidate                              | median (s) | vs torch |")
    print("|------------|----------------------------------------|-----------:|---------:|")
    for op, who, t in rows:
        print(f"| {op:<10} | {who:<38} | {t:10.3f} | {base[op] / t:7.2f}x |")
    print(
        f"\nmedians of {args.runs} runs after a warm-up; load = load + touch of every page; "
        "page cache warm; all loads verified"
    )


if __name__ == "__main__":
    main()
