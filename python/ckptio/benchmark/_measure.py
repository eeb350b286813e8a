"""Timing and memory helpers shared by the runner and its per-candidate child processes."""

from __future__ import annotations

import resource
import time
from typing import Any, Optional

from .. import _core
from .workloads import iter_tensors

__all__ = ["PeakRSS", "touch"]


def touch(obj: Any) -> int:
    """Reads one byte of every page of every tensor in `obj` (so that lazy loaders pay for
    their data) and returns the sum of the bytes read (so nothing is optimised away)."""
    ranges: set[tuple[int, int]] = set()
    for t in iter_tensors(obj):
        if t.device.type != "cpu":
            continue
        s = t.untyped_storage()
        if s.nbytes():
            ranges.add((s.data_ptr(), s.nbytes()))
    total = 0
    end = -1
    merged: list[list[int]] = []
    for addr, n in sorted(ranges):  # one strided read per run of adjacent memory
        if merged and addr <= end:
            end = max(end, addr + n)
            merged[-1][1] = end - merged[-1][0]
        else:
            merged.append([addr, n])
            end = addr + n
    for addr, n in merged:
        # A strided memoryview slice reads one byte per page in C: a few µs per run however
        # many runs there are (a torch op per run would cost more than the page faults it
        # measures when a file holds 20,000 separate records).
        view = _core.io.raw_memoryview(addr, n)
        total += sum(view[::4096]) + view[-1]  # the last byte's page too
    return total


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakRSS:
    """The peak resident set size of this process from start() on (Linux VmHWM, reset through
    /proc/self/clear_refs; elsewhere ru_maxrss, the peak since the process started)."""

    def start(self) -> None:
        self.base = (_status_kib("VmRSS") or 0) * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = "ru_maxrss"

    def peak(self) -> int:
        if self.method.startswith("VmHWM"):
            hwm = _status_kib("VmHWM")
            if hwm is not None:
                return hwm * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out
