"""What ``verify`` costs a first load: ``ckptio.load(..., verify=True)`` against verify off.

    python bench/bench_verify.py [--rounds 15] [--quick] [--dir DIR] [--markdown out.md]
                                 [--json out.json]

Files (``ckptio.benchmark.workloads``): ``llm``, ``ckpt`` and ``small`` saved by ckptio with
``write_crc32`` on (every record's CRC-32 recorded), and ``llm`` without its tied ``lm_head``
in 4 safetensors shards with a manifest (``save(..., max_shard_size=..., manifest=True)``),
whose whole-file CRC-32s a verified load checks. ``--quick``: the workloads' small sizes, no
warm-up round, no settling (a check that the script runs; its timings mean nothing).

Every sample is the FIRST load of a fresh Python process (imports untimed) followed by a touch
of every page (``ckptio.benchmark._measure.touch``), page cache warm: what an inference server
pays. Each round runs the 8 cells (4 files x verify off/on) once, in a new seeded random
order, each after the machine settles (the memory the last process freed is available again).
Every result is compared with the saved objects (a per-tensor byte sum), verify on and off.

Reported per file: the medians off and on, the cost (median on / median off - 1) and a 95%
bootstrap interval of that cost (both sample sets resampled 2,000 times); then the paired
cost: each round's verify-on sample against the same round's verify-off sample of the same
file (``on / off - 1``), their median and its 95% bootstrap interval (the rounds resampled).
A round's two samples run minutes apart at most, so pairing removes what drifts between
rounds (the host's load on a VM); what differs between two processes stays in.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_directories import settle  # noqa: E402

CHILD = "--child"
FILES = ["llm", "ckpt", "small", "llm, 4 safetensors shards + manifest"]
DIRECTORY_SHARD_BYTES = 190_000_000  # 4 shards of llm without lm_head


def _digest(obj: Any) -> list[float]:
    """The byte sum of every tensor of `obj`, in iteration order (ckpt nests them)."""
    from ckptio.benchmark.workloads import iter_tensors

    return [
        float(t.reshape(-1).contiguous().view(torch.uint8).sum(dtype=torch.int64))
        for t in iter_tensors(obj)
    ]


def _paths(root: str) -> dict[str, str]:
    return {
        "llm": os.path.join(root, "llm.pt"),
        "ckpt": os.path.join(root, "ckpt.pt"),
        "small": os.path.join(root, "small.pt"),
        FILES[3]: os.path.join(root, "llm-4-shards"),
    }


def prepare(root: str, quick: bool = False) -> dict[str, list[float]]:
    """Writes the four files under `root`; returns each one's expected digest."""
    import ckptio
    from ckptio.benchmark import workloads

    paths = _paths(root)
    expected: dict[str, list[float]] = {}
    with ckptio.options(write_crc32=True):
        for name in ("llm", "ckpt", "small"):
            obj = workloads.build(name, quick).obj
            ckptio.save(obj, paths[name])
            expected[name] = _digest(obj)
    sd = {k: v for k, v in workloads.build("llm", quick).obj.items() if k != "lm_head.weight"}
    shard = sum(t.nbytes for t in sd.values()) // 3 if quick else DIRECTORY_SHARD_BYTES
    shutil.rmtree(paths[FILES[3]], ignore_errors=True)
    ckptio.save(sd, paths[FILES[3]], max_shard_size=shard, format="safetensors", manifest=True)
    expected[FILES[3]] = _digest(sd)
    return expected


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One fresh-process sample: the load (verify on or off) and the touch, timed."""
    import warnings

    import ckptio
    from ckptio.benchmark._measure import touch

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unverified file would make the row meaningless
        out = ckptio.load(spec["path"], weights_only=False, verify=spec["verify"])
    touch(out)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "digest": _digest(out)}


def _sample(path: str, verify: bool) -> dict[str, Any]:
    spec = json.dumps({"path": path, "verify": verify})
    done = subprocess.run(
        [sys.executable, __file__, CHILD, spec], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(f"verify={verify} on {path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def cost_interval(off: list[float], on: list[float], n: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of median(on) / median(off) - 1."""
    rng = random.Random(0)
    costs = sorted(
        statistics.median(rng.choices(on, k=len(on)))
        / statistics.median(rng.choices(off, k=len(off)))
        - 1
        for _ in range(n)
    )
    return costs[int(0.025 * n)], costs[int(0.975 * n) - 1]


def paired_cost(off: list[float], on: list[float], n: int = 2000) -> tuple[float, float, float]:
    """(median, 2.5th, 97.5th percentile) of the per-round costs ``on[r] / off[r] - 1``: the
    median, and a bootstrap interval of it with the rounds resampled."""
    costs = [b / a - 1 for a, b in zip(off, on, strict=True)]
    rng = random.Random(0)
    boot = sorted(statistics.median(rng.choices(costs, k=len(costs))) for _ in range(n))
    return statistics.median(costs), boot[int(0.025 * n)], boot[int(0.975 * n) - 1]


def markdown(times: dict[str, dict[bool, list[float]]]) -> str:
    lines = [
        "| file | verify off | verify on | cost | 95% interval | paired cost | 95% interval "
        "| processes |",
        "|---|---:|---:|---:|---|---:|---|---:|",
    ]
    for name, by in times.items():
        off, on = by[False], by[True]
        if not off or not on:
            continue
        m_off, m_on = statistics.median(off), statistics.median(on)
        low, high = cost_interval(off, on)
        paired, p_low, p_high = paired_cost(off, on)
        lines.append(
            f"| {name} | {m_off:.3f} s | {m_on:.3f} s | {m_on / m_off - 1:+.1%} | "
            f"{low:+.1%} to {high:+.1%} | {paired:+.1%} | {p_low:+.1%} to {p_high:+.1%} | "
            f"{len(off)} + {len(on)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="small workloads: a smoke run")
    ap.add_argument("--dir", default=None, help="where the files go (default: a temp dir)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)

    root = args.dir or tempfile.mkdtemp(prefix="ckptio-verifybench-")
    os.makedirs(root, exist_ok=True)
    try:
        expected = prepare(root, args.quick)
        paths = _paths(root)
        times: dict[str, dict[bool, list[float]]] = {n: {False: [], True: []} for n in FILES}
        cells = [(n, v) for n in FILES for v in (False, True)]
        shuffle = random.Random(1)
        first = 1 if args.quick else 0  # round 0 warms the page cache, untimed
        for r in range(first, args.rounds + 1):
            for name, verify in shuffle.sample(cells, len(cells)):
                if not args.quick:
                    settle()
                got = _sample(paths[name], verify)
                if got["digest"] != expected[name]:
                    raise RuntimeError(f"{name} (verify={verify}) returned different tensors")
                if r:
                    times[name][verify].append(got["seconds"])
            print(f"  round {r}/{args.rounds} done", flush=True)
            if args.json and r:
                with open(args.json, "w") as f:
                    json.dump({"seconds": times}, f, indent=1, default=str)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    table = markdown(times)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == CHILD:
        print(json.dumps(child(json.loads(sys.argv[2]))))
        sys.exit(0)
    sys.exit(main())
