"""ckptio's benchmark: ckptio against torch, pickle and the other checkpoint loaders.

Run it as ``ckptio bench``, ``python -m ckptio.benchmark`` or ``python bench/compare.py``::

    python -m ckptio.benchmark                         # llm, small and ckpt workloads
    python -m ckptio.benchmark --quick                 # tiny sizes (seconds)
    python -m ckptio.benchmark model.pt other.safetensors --json out.json --plot out.png

The headline is each loader's first load+touch in a fresh process (what an inference server
pays), with cold first loads and repeated loads in one process beside it. The method (warm-up,
interleaved rounds, medians, touch, RSS, the machine's limits) is described in bench/README.md
and in :mod:`ckptio.benchmark.runner`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from .candidates import CANDIDATES
    from .workloads import WORKLOADS

    ap = argparse.ArgumentParser(
        prog="ckptio bench",
        description="Benchmark ckptio against torch.save/torch.load, pickle, safetensors, "
        "fastsafetensors, tensorizer and the Run:ai model streamer; prints a markdown table.",
    )
    ap.add_argument(
        "files",
        nargs="*",
        metavar="FILE",
        help="benchmark loading these files (torch .pt/.pth zip checkpoints, .safetensors, "
        ".tensors) instead of the synthetic workloads",
    )
    ap.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated synthetic workloads (default: {','.join(WORKLOADS)})",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="timed rounds of the saves and of the repeated loads, after a warm-up (5)",
    )
    ap.add_argument(
        "--first-rounds",
        type=int,
        default=5,
        help="fresh processes per candidate for the first loads, after a warm-up one (5)",
    )
    ap.add_argument(
        "--no-cold", action="store_true", help="skip the cold first loads (file evicted)"
    )
    ap.add_argument("--json", metavar="PATH", help="write all results as JSON")
    ap.add_argument("--plot", metavar="PATH", help="draw a PNG chart (needs matplotlib)")
    ap.add_argument("--markdown", metavar="PATH", help="also write the table to a file")
    ap.add_argument("--quick", action="store_true", help="tiny workloads: runs in seconds")
    ap.add_argument(
        "--candidates",
        help=f"comma-separated loaders (default: every installed one): {', '.join(CANDIDATES)}",
    )
    ap.add_argument("--dir", help="directory for the temporary files (default: the system's)")
    ap.add_argument(
        "--no-rss",
        action="store_true",
        help="skip the saves' peak-RSS subprocesses (a load's peak RSS comes with its first loads)",
    )
    ap.add_argument("--no-limits", action="store_true", help="skip the machine's limits")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    """Runs the benchmark with command-line arguments `argv` (default: sys.argv[1:]).

    Returns the process exit status: 0 on success, 1 when a candidate returned a wrong result
    or the benchmark could not run, 2 for bad arguments.
    """
    from .candidates import BenchmarkError
    from .report import markdown, plot, write_json
    from .runner import Settings, run, run_files

    ap = _parser()
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.first_rounds < 1:
        ap.error("--rounds and --first-rounds must be at least 1")
    settings = Settings(
        rounds=args.rounds,
        first_rounds=args.first_rounds,
        cold=not args.no_cold,
        quick=args.quick,
        directory=args.dir,
        candidates=[c.strip() for c in args.candidates.split(",")] if args.candidates else None,
        rss=not args.no_rss,
        limits=not args.no_limits,
    )
    if args.plot:  # fail before the long run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("ckptio bench: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return 2
    try:
        if args.files:
            results = run_files(args.files, settings)
        else:
            names = [w.strip() for w in args.workloads.split(",") if w.strip()]
            results = run(names, settings)
    except (BenchmarkError, ValueError, OSError) as e:
        print(f"ckptio bench: error: {e}", file=sys.stderr)
        return 1
    table = markdown(results)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    if args.json:
        write_json(results, args.json)
    if args.plot:
        plot(results, args.plot)
    return 0
