"""Peak RSS of one operation, measured in a fresh process (``python -m
ckptio.benchmark._child SPEC_JSON``): load+touch a file with one candidate, or save an object
with one format. Prints a JSON object on its last line."""

from __future__ import annotations

import json
import os
import sys

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
        out = cand.load(spec["path"], target)
        touch(out)
    else:
        obj = ckptio.load(spec["source"])  # the object to save, as the run built it
        rss.start()
        FORMATS[spec["fmt"]].save(obj, spec["path"])
        os.unlink(spec["path"])
    peak = rss.peak()
    return {
        "peak_rss": peak,
        "base_rss": rss.base,
        "delta_rss": peak - rss.base,
        "method": rss.method,
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
