"""The pickle pre-scan accepts every memo numbering CPython's unpickler accepts (sparse, from 1,
with gaps) and still refuses memory bombs. The oracle is stock torch.load on the same bytes."""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptio
from ckptio import _core


def _renumber(pkl: bytes, f: Callable[[int], int]) -> bytes:
    """`pkl` with each memo index i stored and fetched as f(i) (BINPUT/BINGET widened to the
    LONG_ forms when f(i) > 255)."""
    ops = list(pickletools.genops(pkl))
    out = bytearray()
    for k, (op, arg, pos) in enumerate(ops):
        end = ops[k + 1][2] if k + 1 < len(ops) else len(pkl)
        assert pos is not None and end is not None
        if op.name in ("BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET"):
            i = f(arg)
            put = "PUT" in op.name
            out += (
                (b"q" if put else b"h") + bytes([i])
                if i < 256
                else ((b"r" if put else b"j") + struct.pack("<I", i))
            )
        else:
            out += pkl[pos:end]
    return bytes(out)


def _pickle_ends(data: bytes) -> list[int]:
    ends, pos = [], 0
    for _ in range(5):
        pos += _core.scan_pickle(memoryview(data)[pos:], False)[3]
        ends.append(pos)
    return ends


def _state() -> dict[str, Any]:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "w": base,
        "view": base[1:3, ::2],  # shares w's storage, non-contiguous
        "t": base.t(),
        "h": torch.ones(3, dtype=torch.float16),
        "i": torch.arange(5, dtype=torch.int64),
        "meta": {"epoch": 3, "names": ["a", "b"], "tied": (1.5, None)},
    }


def _legacy(f: Callable[[int], int]) -> bytes:
    buf = io.BytesIO()
    torch.save(_state(), buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    ends = _pickle_ends(raw)
    obj = raw[ends[2] : ends[3]]
    return raw[: ends[2]] + _renumber(obj, f) + raw[ends[3] :]


def _assert_same(got: Any, want: Any) -> None:
    assert type(got) is type(want)
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.stride() == want.stride() and got.storage_offset() == want.storage_offset()
        assert got.device == want.device
        assert torch.equal(got, want)
    elif isinstance(want, dict):
        assert list(got) == list(want)
        for k in want:
            _assert_same(got[k], want[k])
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            _assert_same(a, b)
    else:
        assert got == want


NUMBERINGS = {
    "from-1": lambda i: i + 1,
    "gaps": lambda i: 3 * i + 2,
    "long-gaps": lambda i: 300 + 7 * i,  # LONG_BINPUT, far above the count of stores
}


@pytest.mark.parametrize("numbering", list(NUMBERINGS), ids=list(NUMBERINGS))
@pytest.mark.parametrize("weights_only", [True, False], ids=["weights_only", "full"])
@pytest.mark.parametrize(
    "map_location", [None, "cpu", torch.device("cpu")], ids=["none", "str", "device"]
)
def test_legacy_sparse_memo_loads_as_torch(
    tmp_path: Path, numbering: str, weights_only: bool, map_location: Any
) -> None:
    data = _legacy(NUMBERINGS[numbering])
    path = tmp_path / "legacy.pt"
    path.write_bytes(data)
    want = torch.load(path, map_location=map_location, weights_only=weights_only)  # the oracle
    got = ckptio.load(path, map_location=map_location, weights_only=weights_only)
    _assert_same(got, want)
    # storage sharing: the view still shares w's storage
    assert got["view"].untyped_storage().data_ptr() == got["w"].untyped_storage().data_ptr()


def _zip_with_pickle(tmp_path: Path, f: Callable[[int], int]) -> Path:
    src = tmp_path / "src.pt"
    torch.save(_state(), src)
    dst = tmp_path / "sparse.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("/data.pkl"):
                data = _renumber(data, f)
            zout.writestr(item, data)
    return dst


@pytest.mark.parametrize("numbering", list(NUMBERINGS), ids=list(NUMBERINGS))
@pytest.mark.parametrize("weights_only", [True, False], ids=["weights_only", "full"])
@pytest.mark.parametrize("mmap", [False, True], ids=["eager", "mmap"])
def test_zip_sparse_memo_loads_as_torch(
    tmp_path: Path, numbering: str, weights_only: bool, mmap: bool
) -> None:
    path = _zip_with_pickle(tmp_path, NUMBERINGS[numbering])
    want = torch.load(path, weights_only=weights_only, mmap=mmap)
    got = ckptio.load(path, weights_only=weights_only, mmap=mmap, map_location="cpu")
    _assert_same(got, want)


BOMBS = {
    "long-binput-2g": b"\x80\x02}r\xff\xff\xff\x7f.",
    "long-binput-4g": b"\x80\x02]r\xff\xff\xff\xff.",
    "put-text-huge": b"(lp99999999999999\n.",
}


@pytest.mark.parametrize("name", list(BOMBS), ids=list(BOMBS))
def test_memo_bombs_refused_without_allocation(tmp_path: Path, name: str) -> None:
    import resource

    pkl = BOMBS[name]
    with pytest.raises(ckptio.CheckpointError, match="is not below the pickle's size"):
        _core.scan_pickle(pkl, False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    path = tmp_path / "bomb.pt"
    path.write_bytes(b"\x80\x02" + pkl[2:] if pkl.startswith(b"\x80") else pkl)
    if pkl.startswith(b"\x80"):
        with pytest.raises(ckptio.CheckpointError, match="memo index"):
            ckptio.load(path, weights_only=False)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 256 * 1024  # KiB


def test_cpython_accepts_what_the_scan_accepts() -> None:
    # Sparse, out-of-order, from-1 numberings load with CPython's own unpickler too.
    for pkl in (b"\x80\x02]q\x05]q\x02h\x05h\x02\x86.", b"((lp 0_0_1 \ng+1\n0g0001\nt."):
        _core.scan_pickle(pkl, False)
        pickle.loads(pkl)
