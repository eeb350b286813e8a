"""Weights-only unpickling of a 20,000-tensor state dict: ckptio against torch.

Both load the same file with mmap=True (so reading data does not count) under cProfile; the
time inside each unpickler's load() is compared (torch: _weights_only_unpickler.Unpickler.load,
pure Python; ckptio: CPython's C unpickler with the allowlisting find_class and checked
rebuilds). Also times ckptio's opcode pre-scan (scan_pickle) of the same data.pkl. Medians of
interleaved runs.

Usage: python bench/unpickle_speed.py [--tensors 20000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import torch

import ckptio
from ckptio import _core
from ckptio._archive import ArchiveReader


def _cumtime(profile: cProfile.Profile, match: tuple[str, str]) -> float:
    stats = pstats.Stats(profile)
    total = 0.0
    for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if file.endswith(match[0]) and func == match[1]:
            total += ct
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tensors", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sd = collections.OrderedDict(
        (f"layers.{i // 4}.block.{i % 4}.weight", torch.full((4,), float(i)))
        for i in range(args.tensors)
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sd.pt"
        torch.save(sd, path)
        pkl = ArchiveReader(_core.io.BufferSource(path.read_bytes(), "sd")).read("data.pkl")
        ours, theirs, scans, ours_total, theirs_total = [], [], [], [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            _core.pickling.scan_pickle(pkl, True)
            scans.append(time.perf_counter() - t0)
            for _who, load, match, sink, total in (
                (
                    "ckptio",
                    ckptio.load,
                    ("~", "<method 'load' of '_pickle.Unpickler' objects>"),
                    ours,
                    ours_total,
                ),
                ("torch", torch.load, ("_weights_only_unpickler.py", "load"), theirs, theirs_total),
            ):
                profile = cProfile.Profile()
                t0 = time.perf_counter()
                profile.enable()
                load(path, mmap=True)
                profile.disable()
                total.append(time.perf_counter() - t0)
                sink.append(_cumtime(profile, match))
        med = statistics.median
        print(f"data.pkl: {len(pkl)} bytes, {args.tensors} tensors")
        print(f"scan_pickle: {med(scans) * 1e6:.0f} us")
        print(
            f"unpickling (under cProfile): ckptio {med(ours) * 1e3:.1f} ms, torch "
            f"{med(theirs) * 1e3:.1f} ms, ratio {med(theirs) / med(ours):.1f}x"
        )
        print(
            f"whole load (mmap, under cProfile): ckptio {med(ours_total) * 1e3:.1f} ms, torch "
            f"{med(theirs_total) * 1e3:.1f} ms"
        )
        # Without the profiler: whole loads, interleaved.
        plain: dict[str, list[float]] = {"ckptio": [], "torch": []}
        for _ in range(args.repeat):
            for who, load in (("ckptio", ckptio.load), ("torch", torch.load)):
                t0 = time.perf_counter()
                load(path, mmap=True)
                plain[who].append(time.perf_counter() - t0)
        print(
            f"whole load (mmap, no profiler): ckptio {med(plain['ckptio']) * 1e3:.1f} ms, "
            f"torch {med(plain['torch']) * 1e3:.1f} ms"
        )


if __name__ == "__main__":
    main()
