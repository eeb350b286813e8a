"""Peak RSS of one operation, measured in a fresh process (``python -m
ckptio.benchmark._child SPEC_JSON``): load+touch a file with one candidate, or save an object
with one format. Prints a JSON object on its last line, with the operation's time: for a
load, what a process's first load costs (imports done, its memory fresh)."""

from __future__ import annotations

import json
import os
import sys
import time

import torch

import ckptio

from ._measure import PeakRSS, touch
from .candidates import CANDIDATES, FORMATS, zeros_like_tree


def main(spec: dict) -> dict:
    rss = PeakRSS()
    if spec["op"] == "load":
        cand = CANDIDATES[spec["candidate"]]
        target = None
        if cand.kind == "reuse":
            target = zeros_like_tree(torch.load(spec["path"], mmap=True))
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
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
