"""The pickle pre-scan accepts every memo numbering CPython's unpickler accepts (sparse, from 1,
with gaps) and still refuses memory bombs. The oracle is stock torch.load on the same bytes."""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import textwrap
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
        pos += _core.pickling.scan_pickle(memoryview(data)[pos:], False).end
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


# Memo indices far past the pickle's size: valid (CPython and torch's weights-only unpickler
# load them), but CPython's C unpickler sizes an array by them (16 bytes a slot: 0x7fffffff asks
# for 32 GiB). ckptio unpickles them with a dict memo, so memory stays bounded by the file.
FAR = {"4096": 4096, "2g": 0x7FFFFFFF}
TINY = {name: b"\x80\x02}r" + struct.pack("<I", i) + b"." for name, i in FAR.items()}


def test_scan_reports_far_memo_indices() -> None:
    for name, i in FAR.items():
        scan = _core.pickling.scan_pickle(TINY[name], True)
        assert scan.complete and scan.memo_size == i + 1 and scan.end == 9
    assert _core.pickling.scan_pickle(b"(lp99999999999999\n.", False).memo_size == 10**14
    assert _core.pickling.scan_pickle(b"\x80\x02]r\xff\xff\xff\xff.", True).memo_size == 2**32
    # A GET of an index never stored is still refused, far or not.
    with pytest.raises(ckptio.CheckpointError, match="memo index 2147483646 was never stored"):
        _core.pickling.scan_pickle(b"\x80\x02}r\xff\xff\xff\x7fj\xfe\xff\xff\x7f.", True)


def _zip_holding(tmp_path: Path, pkl: bytes, byteorder: str = "little") -> Path:
    """A real checkpoint (with its storages) whose data.pkl is `pkl`."""
    src = tmp_path / "src.pt"
    torch.save(_state(), src)
    dst = tmp_path / f"far-{byteorder}.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("/data.pkl"):
                data = pkl
            elif item.filename.endswith("/byteorder"):
                data = byteorder.encode()
            zout.writestr(item, data)
    return dst


def _legacy_holding(pkl: bytes) -> bytes:
    """A real legacy checkpoint whose object pickle is `pkl` (no storages)."""
    buf = io.BytesIO()
    torch.save(_state(), buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    ends = _pickle_ends(raw)
    return raw[: ends[2]] + pkl + b"\x80\x02]q\x00."


def _far_files(tmp_path: Path) -> dict[str, Path]:
    """Legacy and zip files (and a byte-swapped zip, which torch loads) holding the tiny
    pickles and the real state pickle renumbered far past its size."""
    files = {}
    for name, i in FAR.items():
        state = _renumber(_zip_pickle(tmp_path), lambda k, i=i: i - k)
        for kind, pkl in (("tiny", TINY[name]), ("state", state)):
            d = tmp_path / f"{kind}-{name}"
            d.mkdir()
            files[f"zip-{kind}-{name}"] = _zip_holding(d, pkl)
            files[f"zip-big-endian-{kind}-{name}"] = _zip_holding(d, pkl, "big")
        legacy = tmp_path / f"legacy-{name}.pt"
        legacy.write_bytes(_legacy_holding(TINY[name]))
        files[f"legacy-tiny-{name}"] = legacy
        legacy_state = tmp_path / f"legacy-state-{name}.pt"
        legacy_state.write_bytes(_legacy(lambda k, i=i: i - k))
        files[f"legacy-state-{name}"] = legacy_state
    return files


def _zip_pickle(tmp_path: Path) -> bytes:
    src = tmp_path / "state.pt"
    torch.save(_state(), src)
    with zipfile.ZipFile(src) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


@pytest.mark.parametrize("weights_only", [True, False], ids=["weights_only", "full"])
def test_far_memo_indices_load_as_torch(tmp_path: Path, weights_only: bool) -> None:
    for name, path in _far_files(tmp_path).items():
        if "big-endian" in name:
            continue  # torch reads a big-endian file's storages byte-swapped
        # torch's full loader is CPython's C unpickler: 0x7fffffff would cost it 32 GiB, so
        # its weights-only load (a dict memo) is the oracle there.
        want = torch.load(path, weights_only=weights_only or not name.endswith("4096"))
        got = ckptio.load(path, weights_only=weights_only)
        _assert_same(got, want)
        if not name.startswith("legacy"):
            mmapped = ckptio.load(path, weights_only=weights_only, mmap=True)
            _assert_same(mmapped, want)


def test_far_memo_indices_load_in_bounded_memory(tmp_path: Path) -> None:
    # Every load path of every file, in a child whose address space is capped at 512 MiB above
    # what it maps after importing torch: no unpickler may size its memo by the index.
    from hostile.child import LIMIT_MEMORY, run_child

    files = _far_files(tmp_path)
    script = LIMIT_MEMORY + textwrap.dedent("""
        import io, pickle, sys
        import ckptio

        class PurePickle:  # a pickle_module whose Unpickler keeps its memo in a dict
            Unpickler = pickle._Unpickler
            load = staticmethod(pickle._load)
            __name__ = "pure_pickle"

        limit_memory(512 << 20)
        for path in sys.argv[1:]:
            data = open(path, "rb").read()
            runs = {
                "weights_only": lambda: ckptio.load(path),
                "full": lambda: ckptio.load(path, weights_only=False),
                "full-pure-module": lambda: ckptio.load(
                    path, weights_only=False, pickle_module=PurePickle
                ),
                "buffer": lambda: ckptio.load(io.BytesIO(data), weights_only=False),
            }
            if "legacy" not in path and "big" not in path:
                runs["mmap"] = lambda: ckptio.load(path, weights_only=False, mmap=True)
                runs["load_into"] = lambda: ckptio.load_into({}, path, strict=False)
                runs["open"] = lambda: ckptio.open(path).keys()
            for how, run in runs.items():
                run()
                print(path, how, "ok", flush=True)
    """)
    proc = run_child(script, *map(str, files.values()), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = proc.stdout.count(" ok\n")
    assert ran == 4 * len(files) + 3 * sum("legacy" not in n and "big" not in n for n in files)


class _CUnpicklerModule:
    """A user's pickle_module whose Unpickler is CPython's C one underneath."""

    class Unpickler(pickle.Unpickler):
        pass

    load = staticmethod(pickle.load)
    __name__ = "c_pickle"


def test_unknown_pickle_module_refused_only_for_a_real_memo_bomb(tmp_path: Path) -> None:
    small = _zip_holding(tmp_path, TINY["4096"])  # a 64 KiB array: loads
    assert ckptio.load(small, weights_only=False, pickle_module=_CUnpicklerModule) == {}
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(_legacy_holding(TINY["4096"]))
    assert ckptio.load(legacy, weights_only=False, pickle_module=_CUnpicklerModule) == {}
    d = tmp_path / "bomb"
    d.mkdir()
    for path in (_zip_holding(d, TINY["2g"]), _zip_holding(d, TINY["2g"], "big")):
        with pytest.raises(ckptio.CheckpointError, match="memo index 2147483647, far past"):
            ckptio.load(path, weights_only=False, pickle_module=_CUnpicklerModule)
    legacy.write_bytes(_legacy_holding(TINY["2g"]))
    with pytest.raises(ckptio.CheckpointError, match="memo index 2147483647, far past"):
        ckptio.load(legacy, weights_only=False, pickle_module=_CUnpicklerModule)


def test_cpython_accepts_what_the_scan_accepts() -> None:
    # Sparse, out-of-order, from-1 numberings load with CPython's own unpickler too.
    for pkl in (b"\x80\x02]q\x05]q\x02h\x05h\x02\x86.", b"((lp 0_0_1 \ng+1\n0g0001\nt."):
        _core.pickling.scan_pickle(pkl, False)
        pickle.loads(pkl)


# CPython's unpickler is iterative: it loads any nesting a pickle describes, and so must every
# load path (ckptio's own walks over the result included).
DEPTH = 100_000


def _unwrap(obj: Any, depth: int) -> Any:
    for _ in range(depth):  # iterative: == on deep tuples would recurse
        assert type(obj) is tuple and len(obj) == 1
        obj = obj[0]
    return obj


def _deep(pkl: bytes) -> bytes:
    """`pkl` with its object wrapped in DEPTH 1-tuples."""
    assert pkl.endswith(b".")
    return pkl[:-1] + b"\x85" * DEPTH + b"."


@pytest.mark.parametrize("weights_only", [True, False], ids=["weights_only", "full"])
def test_deep_nesting_loads_as_torch(tmp_path: Path, weights_only: bool) -> None:
    path = _zip_holding(tmp_path, _deep(_zip_pickle(tmp_path)))
    buf = io.BytesIO()
    torch.save(_state(), buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    ends = _pickle_ends(raw)
    legacy = tmp_path / "deep-legacy.pt"
    legacy.write_bytes(raw[: ends[2]] + _deep(raw[ends[2] : ends[3]]) + raw[ends[3] :])
    for p in (path, legacy):
        want = _unwrap(torch.load(p, weights_only=weights_only), DEPTH)
        _assert_same(_unwrap(ckptio.load(p, weights_only=weights_only), DEPTH), want)
    _assert_same(_unwrap(ckptio.load(path, mmap=True), DEPTH), want)
    assert ckptio.load_into({}, path, strict=False) is not None
    with ckptio.open(path) as handle:
        name = ".".join(["0"] * DEPTH + ["w"])
        assert name in handle.keys()
        assert torch.equal(handle[name], want["w"])


def test_dcp_metadata_with_far_memo_indices_loads(tmp_path: Path) -> None:
    # The .metadata file of a DCP checkpoint is a pickle too: the same rule holds there.
    from torch.distributed.checkpoint.metadata import Metadata

    from ckptio import dcp

    pkl = pickle.dumps(Metadata(state_dict_metadata={}, planner_data={"a": [1]}), protocol=2)
    (tmp_path / ".metadata").write_bytes(_renumber(pkl, lambda i: 0x7FFFFFFF - i))
    got = dcp.Reader(tmp_path).read_metadata()
    assert got.state_dict_metadata == {} and got.planner_data == {"a": [1]}
    (tmp_path / ".metadata").write_bytes(pkl[:-3])
    with pytest.raises(ckptio.CheckpointError, match=".metadata"):
        dcp.Reader(tmp_path).read_metadata()
