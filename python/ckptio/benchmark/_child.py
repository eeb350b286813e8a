"""Measurements that need a fresh process (``python -m ckptio.benchmark._child SPEC_JSON``).
Prints a JSON object on its last line.

* ``load``: a process's FIRST load+touch of a file with one candidate (imports done, nothing
  loaded before, its memory fresh), its time and peak RSS: what an inference server pays. With
  ``"cold": true`` the file is evicted from the page cache first (``posix_fadvise`` DONTNEED)
  and ``mincore`` tells how much of it stayed resident.
* ``limit``: one machine limit (limits.py) timed as the first thing a fresh process does, cold
  or warm like the loads beside it.
* ``save``: the peak RSS and time of one save of an object with one format.
* ``rounds``: a workload's load rounds (runner.load_rounds), in a process that has neither
  built the workload nor run any writer: the writers leave state behind that slows later
  loads (safetensors' save_file leaves about 206,000 objects alive for good after saving the
  small workload: ctypes types made per distinct tensor size, held by ctypes' pointer-type
  cache), which a user's loading process does not carry."""

from __future__ import annotations

import json
import os
import sys
import time

import torch

import ckptio

from ._measure import PeakRSS, touch
from .candidates import CANDIDATES, FORMATS, zeros_like_tree
from .limits import Limits, evict


def _reuse_target(path: str) -> object:
    """Zero-filled tensors shaped like the file's, for a candidate that loads into them."""
    return zeros_like_tree(torch.load(path, mmap=True, weights_only=True))


def rounds(spec: dict) -> dict:
    from .runner import load_rounds

    loaders = {n: (CANDIDATES[n], p) for n, p in spec["loaders"].items()}
    targets = {n: _reuse_target(p) for n, (c, p) in loaders.items() if c.kind == "reuse"}
    limits = Limits(**spec["limits"]) if spec["limits"] else None
    try:
        times, ltimes = load_rounds(loaders, targets, limits, spec["rounds"], spec["skip"])
    finally:
        if limits is not None:
            limits.close()
    return {"times": times, "ltimes": ltimes}


def limit(spec: dict) -> dict:
    limits = Limits(spec["source"], spec["scratch"])
    try:
        seconds, resident = limits.first(spec["limit"], cold=spec.get("cold", False))
    finally:
        limits.close()
    return {"seconds": seconds, "resident": resident, "note": limits.cold_note}


def main(spec: dict) -> dict:
    if spec["op"] == "rounds":
        return rounds(spec)
    if spec["op"] == "limit":
        return limit(spec)
    rss = PeakRSS()
    resident = None
    if spec["op"] == "load":
        cand = CANDIDATES[spec["candidate"]]
        target = _reuse_target(spec["path"]) if cand.kind == "reuse" else None
        if spec.get("cold"):
            resident = evict(spec["path"])
        rss.start()
        t0 = time.perf_counter()
        out = cand.load(spec["path"], target)
        touch(out)
        seconds = time.perf_counter() - t0
    else:
        obj = ckptio.load(spec["source"])  # the object to save, as the run built it
        rss.start()
        t0 = time.perf_counter()
        FORMATS[spec["fmt"]].save(obj, spec["path"])
        seconds = time.perf_counter() - t0
        os.unlink(spec["path"])
    peak = rss.peak()
    return {
        "seconds": seconds,
        "peak_rss": peak,
        "base_rss": rss.base,
        "delta_rss": peak - rss.base,
        "method": rss.method,
        "resident": resident,  # cold loads: the fraction of the file still cached (mincore)
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
