"""The comparison: ckptio against torch, pickle and its peers (a thin wrapper).

    python bench/compare.py [--quick] [--workloads llm,small,ckpt] [--rounds 5] \
        [--json results.json] [--plot chart.png] [FILE ...]

Same as ``ckptio bench`` and ``python -m ckptio.benchmark``; see bench/README.md.
"""

from __future__ import annotations

import sys

from ckptio.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
