"""Writes the fuzzers' seed corpus: small valid checkpoints (ckptio- and torch-written, with
views, shared storages, nested containers, several protocols) and their data.pkl alone.

Usage: python fuzz/make_seeds.py DIR
"""

from __future__ import annotations

import collections
import io
import sys
from pathlib import Path

import torch

import ckptio
from ckptio import _core
from ckptio._archive import ArchiveReader


def objects() -> dict[str, object]:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return {
        "state_dict": collections.OrderedDict(
            [("w", torch.ones(2, 3)), ("b", torch.zeros(3, dtype=torch.float16))]
        ),
        "views": {"base": base, "t": base.t(), "row": base[1], "narrow": base[:, 1:3]},
        "nested": {"a": [1, 2.5, "x", None, True], "b": (torch.tensor([1, 2]), {"c": b"xy"})},
        "empty": {"e": torch.empty(0), "s": torch.tensor(3.0)},
        "param": {"p": torch.nn.Parameter(torch.randn(2, 2))},
        "ints": {"big": 2**70, "neg": -5, "i8": torch.tensor([1, -1], dtype=torch.int8)},
    }


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, obj in objects().items():
        variants = {
            f"{name}.ckptio.pt": lambda f, o=obj: ckptio.save(o, f),
            f"{name}.torch.pt": lambda f, o=obj: torch.save(o, f),
            f"{name}.torch-p4.pt": lambda f, o=obj: torch.save(o, f, pickle_protocol=4),
        }
        for fname, write in variants.items():
            path = out / fname
            write(path)
            reader = ArchiveReader(_core.io.BufferSource(path.read_bytes(), fname))
            (out / (fname + ".data.pkl")).write_bytes(reader.read("data.pkl"))
    legacy = io.BytesIO()
    torch.save(objects()["state_dict"], legacy, _use_new_zipfile_serialization=False)
    (out / "legacy.pt").write_bytes(legacy.getvalue())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
