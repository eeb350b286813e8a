"""atheris target over the whole weights-only load: ckptio.load(BytesIO(data)).

Coverage comes from ckptio's Python modules (instrumented) and libFuzzer's value profile; the
native parsers are fuzzed with their own coverage by fuzz/fuzz_parsers.cpp. Any exception
other than CheckpointError, OSError or pickle.UnpicklingError (UnsafeGlobalError is one), or a
crash, is a finding.

Usage: python fuzz/fuzz_load.py [libFuzzer flags] CORPUS_DIR...
"""

from __future__ import annotations

import io
import pickle
import sys

import atheris
import torch  # noqa: F401  (imported first: torch itself is not instrumented)

with atheris.instrument_imports(include=["ckptio"]):
    import ckptio

# UnsafeGlobalError is a pickle.UnpicklingError; torch's legacy parser refuses globals with
# the base class.
ALLOWED = (ckptio.CheckpointError, OSError, pickle.UnpicklingError)


def test_one_input(data: bytes) -> None:
    for kwargs in ({}, {"map_location": "meta"}):
        try:
            ckptio.load(io.BytesIO(data), **kwargs)
        except ALLOWED:
            pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
