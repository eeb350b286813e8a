"""A/B timing of ckptio.save / ckptio.load against torch, and of two ckptio builds.

    python bench/ab.py prepare --dir /tmp/ab              # write the workload files once
    python bench/ab.py run --dir /tmp/ab --reps 5          # medians of this ckptio and torch
    python bench/ab.py compare --dir /tmp/ab --base A --new B --rounds 3

``run`` times, in one process and interleaved within each round (round 0 is a warm-up): eager
load, mmap load and save of the **small** workload (20,000 tensors of 256 B to 64 KiB) and of
the **llm** workload (GPT-2-medium fp16, ~710 MB), for ckptio and for torch. Eager llm loads
touch one byte per page (ckptio's eager loads are resident anyway; this keeps it honest).
Before each timed save a throwaway file of ~1.2x the payload is written and deleted (page-cache
writes after idle run slower on these VMs) and the target is unlinked.

``compare`` alternates ``run`` subprocesses whose PYTHONPATH puts ckptio build A or B first
(``pip install --target A .`` at each revision), so both meet the same machine state, and
prints the medians of each row side by side with torch's from the same subprocesses.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch


def _load_workloads() -> Any:
    # By file path, not through the ckptio package: the build under test may predate it.
    path = Path(__file__).resolve().parents[1] / "python" / "ckptio" / "benchmark" / "workloads.py"
    spec = importlib.util.spec_from_file_location("_ab_workloads", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


build = _load_workloads().build
WORKLOADS: dict[str, Callable[[], Any]] = {
    "small": lambda: build("small").obj,
    "llm": lambda: build("llm").obj,
}


def _prime_writes(directory: str, nbytes: int) -> None:
    # As ckptio.benchmark.runner.prime_writes; a copy, since the build under test may predate it.
    scratch = os.path.join(directory, "prime.bin")
    block = b"\0" * (16 << 20)
    with open(scratch, "wb") as f:
        for _ in range(max(1, int(nbytes * 1.2) // len(block))):
            f.write(block)
    os.unlink(scratch)


def _touch(sd: dict) -> None:
    for t in sd.values():
        if t.numel():
            t.view(-1).view(torch.uint8)[::4096].sum()


def _nbytes(sd: dict) -> int:
    seen: set[int] = set()
    total = 0
    for t in sd.values():
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def cmd_prepare(args: argparse.Namespace) -> None:
    import ckptio

    os.makedirs(args.dir, exist_ok=True)
    for name in args.workloads.split(","):
        sd = WORKLOADS[name]()
        torch.save(sd, os.path.join(args.dir, f"{name}.torch.pt"))
        ckptio.save(sd, os.path.join(args.dir, f"{name}.ckptio.pt"))
        print(f"{name}: {_nbytes(sd) / 1e6:.0f} MB, {len(sd)} tensors")


def _medians(cands: dict[str, Callable[[], Any]], reps: int, before: Any = None) -> dict:
    names = list(cands)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps + 1):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            if before is not None:
                before(n)
            t0 = time.perf_counter()
            out = cands[n]()
            dt = time.perf_counter() - t0
            del out
            if r:
                times[n].append(dt)
    return {n: statistics.median(v) for n, v in times.items()}


def _run_workload(name: str, d: str, ops: set[str], reps: int) -> dict[str, float]:
    import ckptio

    results: dict[str, float] = {}
    tp, cp = os.path.join(d, f"{name}.torch.pt"), os.path.join(d, f"{name}.ckptio.pt")
    touch = name == "llm"

    def eager(fn: Callable[[], dict]) -> Callable[[], dict]:
        def go() -> dict:
            sd = fn()
            if touch:
                _touch(sd)
            return sd

        return go

    def add(op: str, medians: dict[str, float]) -> None:
        results.update({f"{name}/{op}/{k}": v for k, v in medians.items()})

    if "load" in ops:
        cands = {
            "torch": eager(lambda: torch.load(tp)),
            "ckptio": eager(lambda: ckptio.load(cp)),
        }
        add("load", _medians(cands, reps))
    if "mmap" in ops:
        cands = {
            "torch": lambda: torch.load(tp, mmap=True),
            "ckptio": lambda: ckptio.load(cp, mmap=True),
        }
        add("mmap", _medians(cands, reps))
    if "save" in ops:
        sd = WORKLOADS[name]()
        size = _nbytes(sd)
        out = {"torch": os.path.join(d, "out.torch.pt"), "ckptio": os.path.join(d, "out.pt")}

        def before(n: str) -> None:
            for p in out.values():
                if os.path.exists(p):
                    os.unlink(p)
            _prime_writes(d, size)

        cands = {
            "torch": lambda: torch.save(sd, out["torch"]),
            "ckptio": lambda: ckptio.save(sd, out["ckptio"]),
        }
        add("save", _medians(cands, reps, before))
        for p in out.values():
            if os.path.exists(p):
                os.unlink(p)
    return results


def cmd_run(args: argparse.Namespace) -> None:
    results: dict[str, float] = {}
    for name in args.workloads.split(","):
        results.update(_run_workload(name, args.dir, set(args.ops.split(",")), args.reps))
    print(json.dumps(results))


def cmd_compare(args: argparse.Namespace) -> None:
    runs: dict[str, list[dict[str, float]]] = {"base": [], "new": []}
    for r in range(args.rounds):
        order = ["base", "new"] if r % 2 == 0 else ["new", "base"]
        for which in order:
            env = dict(os.environ, PYTHONPATH=getattr(args, which))
            cmd = [sys.executable, __file__, "run", "--dir", args.dir, "--reps", str(args.reps)]
            cmd += ["--workloads", args.workloads, "--ops", args.ops]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            runs[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = sorted(runs["base"][0])
    print("| row | base torch | base ckptio | new torch | new ckptio | base x | new x |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if not row.endswith("/ckptio"):
            continue
        stem = row[: -len("/ckptio")]
        med = {
            w: {
                c: statistics.median(x[f"{stem}/{c}"] for x in runs[w]) for c in ("torch", "ckptio")
            }
            for w in runs
        }
        print(
            f"| {stem} | {med['base']['torch']:.3f} | {med['base']['ckptio']:.3f} | "
            f"{med['new']['torch']:.3f} | {med['new']['ckptio']:.3f} | "
            f"{med['base']['torch'] / med['base']['ckptio']:.2f} | "
            f"{med['new']['torch'] / med['new']['ckptio']:.2f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("prepare", "run", "compare"):
        p = sub.add_parser(name)
        p.add_argument("--dir", required=True)
        p.add_argument("--workloads", default="small,llm")
        p.add_argument("--ops", default="load,mmap,save")
        p.add_argument("--reps", type=int, default=5)
        if name == "compare":
            p.add_argument("--base", required=True)
            p.add_argument("--new", required=True)
            p.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    {"prepare": cmd_prepare, "run": cmd_run, "compare": cmd_compare}[args.cmd](args)


if __name__ == "__main__":
    main()
