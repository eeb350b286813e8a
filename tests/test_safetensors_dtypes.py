"""Every dtype the safetensors format names, both ways against the safetensors package: the
low-precision ones of MXFP4/NVFP4 checkpoints (F8_E8M0 scales, F4 weights packed two to a
byte) as well as the 8-bit floats, unsigned ints, BOOL and C64. Values are compared bitwise.

F4 is the one dtype whose header shape differs from torch's: safetensors stores F4 in torch as
``float4_e2m1fn_x2`` (one byte, two values), and its header records the logical element count,
so the last dimension in the header is twice torch's."""

from __future__ import annotations

import io
import json
import struct
import types
from pathlib import Path

import pytest
import torch

import ckptio
from ckptio import _safetensors

st = pytest.importorskip("safetensors.torch")
safe_open = pytest.importorskip("safetensors").safe_open

# The format's dtype names and the torch dtype safetensors loads each as, in the reference
# writer's order (its Rust Dtype enum; it sorts tensors by this order, descending, then by
# name). Written out here independently of ckptio's table.
FORMAT = [
    ("BOOL", "bool"),
    ("F4", "float4_e2m1fn_x2"),
    ("F6_E2M3", None),
    ("F6_E3M2", None),
    ("U8", "uint8"),
    ("I8", "int8"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E8M0", "float8_e8m0fnu"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("I16", "int16"),
    ("U16", "uint16"),
    ("F16", "float16"),
    ("BF16", "bfloat16"),
    ("I32", "int32"),
    ("U32", "uint32"),
    ("F32", "float32"),
    ("C64", "complex64"),
    ("F64", "float64"),
    ("I64", "int64"),
    ("U64", "uint64"),
]
HAVE = [
    (name, getattr(torch, attr))
    for name, attr in FORMAT
    if attr is not None and hasattr(torch, attr)
]
IDS = [name for name, _ in HAVE]
F4 = getattr(torch, "float4_e2m1fn_x2", None)
E8M0 = getattr(torch, "float8_e8m0fnu", None)


def _values(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bytes viewed as `dtype` (bool: 0 or 1), so every bit pattern is exercised."""
    g = torch.Generator().manual_seed(seed)
    numel = 1
    for d in shape:
        numel *= d
    hi = 2 if dtype == torch.bool else 256
    raw = torch.randint(0, hi, (numel * dtype.itemsize,), generator=g, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def _shapes(dtype: torch.dtype) -> list[tuple[int, ...]]:
    # A 0-d F4 tensor would be one byte holding two values in torch but a single 4-bit value
    # in the header: safetensors refuses it (test_f4_scalar_is_refused).
    scalar: list[tuple[int, ...]] = [] if dtype == F4 else [()]
    return [(5, 4), (3,), *scalar, (0,), (0, 4), (4, 0)]


def _tensors(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    return {
        "t" + "x".join(map(str, shape)): _values(dtype, shape, seed + i)
        for i, shape in enumerate(_shapes(dtype))
    }


def _bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist())


def _assert_same(expected: torch.Tensor, got: torch.Tensor, where: str) -> None:
    assert got.dtype == expected.dtype, where
    assert got.shape == expected.shape, where
    assert got.stride() == expected.stride(), where
    assert _bytes(expected) == _bytes(got), where


def _header(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


def test_table_is_every_dtype_this_torch_has() -> None:
    assert _safetensors.DTYPES == dict(HAVE)
    assert {d: n for n, d in _safetensors.DTYPES.items()} == _safetensors._NAMES


@pytest.mark.parametrize("mmap", [False, True], ids=["eager", "mmap"])
@pytest.mark.parametrize(("name", "dtype"), HAVE, ids=IDS)
def test_load_reads_what_safetensors_writes(
    tmp_path: Path, name: str, dtype: torch.dtype, mmap: bool
) -> None:
    path = tmp_path / "theirs.safetensors"
    st.save_file(_tensors(dtype), str(path))
    assert {e["dtype"] for e in _header(path.read_bytes()).values()} == {name}
    expected = st.load_file(str(path))
    got = ckptio.load(path, mmap=mmap)
    # (safetensors returns them by offset, ties among empty tensors in no set order)
    assert sorted(got) == sorted(expected)
    for k in expected:
        _assert_same(expected[k], got[k], k)


@pytest.mark.parametrize(("name", "dtype"), HAVE, ids=IDS)
def test_open_reads_what_safetensors_writes(tmp_path: Path, name: str, dtype: torch.dtype) -> None:
    path = tmp_path / "theirs.safetensors"
    st.save_file(_tensors(dtype, seed=7), str(path))
    expected = st.load_file(str(path))
    with ckptio.open(path) as h:
        assert sorted(h.keys()) == sorted(expected)
        for k, want in expected.items():
            info = h.info(k)
            assert (info.dtype, info.shape) == (want.dtype, tuple(want.shape)), k
            assert info.nbytes == want.numel() * want.element_size(), k
            _assert_same(want, h[k], k)
            s = h.get_slice(k)
            assert s.dtype == dtype and s.shape == tuple(want.shape), k
            _assert_same(want, s[...], k)
            if want.dim() == 2:
                # torch has no copy kernel for float4_e2m1fn_x2: slice and copy its bytes
                raw = want.view(torch.uint8) if dtype == F4 else want
                _assert_same(raw[1:3].contiguous().view(dtype), s[1:3], k)
                _assert_same(raw[:, 1:3].contiguous().view(dtype), s[:, 1:3], k)
    if dtype != F4:  # safetensors 0.8 slices F4 by its header shape and fails
        with safe_open(str(path), "pt") as f, ckptio.open(path) as h:
            for k in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                ref = f.get_slice(k)
                if not ref.get_shape():
                    continue
                assert h.get_slice(k).get_shape() == ref.get_shape(), k
                _assert_same(ref[1:3], h.get_slice(k)[1:3], k)


@pytest.mark.parametrize(("name", "dtype"), HAVE, ids=IDS)
def test_save_writes_what_safetensors_writes(tmp_path: Path, name: str, dtype: torch.dtype) -> None:
    tensors = _tensors(dtype, seed=3)
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    ckptio.save(tensors, ours, format="safetensors", metadata={"k": "v"})
    st.save_file(tensors, str(theirs), metadata={"k": "v"})
    assert ours.read_bytes() == theirs.read_bytes()
    buf = io.BytesIO()
    ckptio.save(tensors, buf, format="safetensors", metadata={"k": "v"})
    assert buf.getvalue() == theirs.read_bytes()
    back = st.load_file(str(ours))
    for k, t in tensors.items():
        _assert_same(t, back[k], k)


def test_every_dtype_in_one_file_is_byte_identical(tmp_path: Path) -> None:
    # Names that sort against the dtype order, so a wrong rank shows in the data order.
    tensors: dict[str, torch.Tensor] = {}
    for i, (name, dtype) in enumerate(HAVE):
        tensors[f"{len(HAVE) - i:02d}.{name}"] = _values(dtype, (3, 2), seed=i)
        tensors[f"{i:02d}.{name}.b"] = _values(dtype, (2,), seed=50 + i)
        tensors[f"{i:02d}.{name}.empty"] = _values(dtype, (0, 2), seed=0)
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    ckptio.save(tensors, ours, format="safetensors")
    st.save_file(tensors, str(theirs))
    assert ours.read_bytes() == theirs.read_bytes()
    expected = st.load_file(str(theirs))
    for mmap in (False, True):
        got = ckptio.load(ours, mmap=mmap)
        assert sorted(got) == sorted(expected)
        for k in expected:
            _assert_same(expected[k], got[k], k)


# --------------------------------------------------------------------------------- F4 shapes
needs_f4 = pytest.mark.skipif(F4 is None, reason="this torch has no float4_e2m1fn_x2")


@needs_f4
@pytest.mark.parametrize(
    ("shape", "header_shape"),
    [((2, 3), [2, 6]), ((1,), [2]), ((2, 1, 3), [2, 1, 6]), ((0,), [0]), ((0, 3), [0, 6])]
    + [((3, 0), [3, 0])],
    ids=["2x3", "1", "2x1x3", "0", "0x3", "3x0"],
)
def test_f4_header_doubles_the_last_dimension(
    tmp_path: Path, shape: tuple[int, ...], header_shape: list[int]
) -> None:
    t = _values(torch.uint8, shape, seed=1).view(F4)
    nbytes = t.numel()
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    ckptio.save({"w": t}, ours, format="safetensors")
    st.save_file({"w": t}, str(theirs))
    golden = {"w": {"dtype": "F4", "shape": header_shape, "data_offsets": [0, nbytes]}}
    assert _header(theirs.read_bytes()) == golden
    assert ours.read_bytes() == theirs.read_bytes()
    assert ours.read_bytes().endswith(_bytes(t))
    got = ckptio.load(theirs)["w"]
    assert got.dtype == F4 and tuple(got.shape) == shape
    assert _bytes(got) == _bytes(t)


@needs_f4
def test_f4_scalar_is_refused(tmp_path: Path) -> None:
    t = torch.tensor(7, dtype=torch.uint8).view(F4)
    with pytest.raises(Exception, match="byte boundary"):
        st.save_file({"w": t}, str(tmp_path / "theirs.safetensors"))
    with pytest.raises(ValueError, match="'w'.*0-d"):
        ckptio.save({"w": t}, tmp_path / "ours.safetensors", format="safetensors")
    assert not (tmp_path / "ours.safetensors").exists()


def _file(entries: dict, data: bytes) -> bytes:
    text = json.dumps(entries).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _f4(shape: list[int], nbytes: int, data: int | None = None) -> bytes:
    entry = {"dtype": "F4", "shape": shape, "data_offsets": [0, nbytes]}
    return _file({"w": entry}, b"\x11" * (nbytes if data is None else data))


@needs_f4
@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (_f4([3], 2), "whole number of bytes"),
        (_f4([3], 1), "whole number of bytes"),
        (_f4([], 1), "whole number of bytes"),
        (_f4([], 0), "whole number of bytes"),
        (_f4([2, 3], 3), "last dimension"),
        (_f4([0, 3], 0), "last dimension"),
        (_f4([4], 4), "needs 2 bytes"),
        (_f4([4], 1), "needs 2 bytes"),
        (_f4([4], 2, data=3), "cover 2 bytes of a 3-byte"),
    ],
    ids=["odd-2B", "odd-1B", "scalar-1B", "scalar-0B", "odd-last", "odd-last-empty"]
    + ["offsets-too-long", "offsets-too-short", "trailing-data"],
)
def test_hostile_f4_headers(tmp_path: Path, blob: bytes, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(Exception):  # noqa: B017 - the oracle refuses each, in its own words
        st.load_file(str(path))
    for mmap in (False, True):
        with pytest.raises(ckptio.CheckpointError, match=message) as info:
            ckptio.load(path, mmap=mmap)
        assert "'w'" in str(info.value) or "cover" in str(info.value)
    with pytest.raises(ckptio.CheckpointError, match=message):
        ckptio.open(path)


@needs_f4
def test_f4_empty_with_even_last_dimension_loads(tmp_path: Path) -> None:
    path = tmp_path / "e.safetensors"
    path.write_bytes(_f4([3, 0], 0))
    assert tuple(st.load_file(str(path))["w"].shape) == (3, 0)
    got = ckptio.load(path)["w"]
    assert got.dtype == F4 and tuple(got.shape) == (3, 0)


@pytest.mark.parametrize(
    ("entry", "data"),
    [
        ({"dtype": "F8_E8M0", "shape": [3], "data_offsets": [0, 2]}, 2),
        ({"dtype": "F8_E8M0", "shape": [2], "data_offsets": [0, 3]}, 3),
        ({"dtype": "U16", "shape": [3], "data_offsets": [0, 3]}, 3),
        ({"dtype": "C64", "shape": [1], "data_offsets": [0, 4]}, 4),
    ],
    ids=["e8m0-short", "e8m0-long", "u16-odd", "c64-half"],
)
def test_offsets_that_disagree_with_the_shape_are_refused(
    tmp_path: Path, entry: dict, data: int
) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_file({"w": entry}, b"\0" * data))
    with pytest.raises(Exception):  # noqa: B017
        st.load_file(str(path))
    # A torch without float8_e8m0fnu cannot represent the tensor at all, and is told so first.
    lacks = entry["dtype"] == "F8_E8M0" and E8M0 is None
    message = "'w' has dtype 'F8_E8M0'.*no torch.float8_e8m0fnu" if lacks else "'w' of shape"
    with pytest.raises(ckptio.CheckpointError, match=message):
        ckptio.load(path)


# ---------------------------------------------------------------- dtypes this torch lacks
def _torch_without(*missing: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        **{a: getattr(torch, a) for _, a in FORMAT if a and hasattr(torch, a) and a not in missing}
    )


@pytest.fixture
def old_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """ckptio's table as built under a torch without float8_e8m0fnu and float4_e2m1fn_x2
    (torch 2.5, say)."""
    dtypes = _safetensors._build_dtypes(_torch_without("float8_e8m0fnu", "float4_e2m1fn_x2"))
    assert "F8_E8M0" not in dtypes and "F4" not in dtypes and "F8_E4M3" in dtypes
    monkeypatch.setattr(_safetensors, "DTYPES", dtypes)
    monkeypatch.setattr(_safetensors, "_NAMES", {d: n for n, d in dtypes.items()})


@pytest.mark.usefixtures("old_torch")
@pytest.mark.parametrize(
    ("entry", "attr"),
    [
        ({"dtype": "F8_E8M0", "shape": [2], "data_offsets": [0, 2]}, "float8_e8m0fnu"),
        ({"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}, "float4_e2m1fn_x2"),
    ],
    ids=["F8_E8M0", "F4"],
)
def test_a_dtype_this_torch_lacks_is_named(tmp_path: Path, entry: dict, attr: str) -> None:
    path = tmp_path / "new.safetensors"
    empty = {"dtype": "U8", "shape": [0], "data_offsets": [2, 2]}
    path.write_bytes(_file({"w": entry, "ok": empty}, b"\0" * 2))
    for load in (ckptio.load, ckptio.open):
        with pytest.raises(ckptio.CheckpointError) as info:
            load(path)
        text = str(info.value)
        assert f"'{entry['dtype']}'" in text and f"torch.{attr}" in text and "'w'" in text
        assert torch.__version__ in text


@pytest.mark.skipif(E8M0 is None, reason="this torch has no float8_e8m0fnu")
@pytest.mark.usefixtures("old_torch")
def test_saving_a_dtype_the_table_lacks_is_refused(tmp_path: Path) -> None:
    t = torch.ones(2, dtype=torch.uint8).view(E8M0)
    with pytest.raises(ValueError, match="'w' has dtype torch.float8_e8m0fnu"):
        ckptio.save({"w": t}, tmp_path / "x.safetensors", format="safetensors")


@pytest.mark.parametrize(
    ("dtype", "message"),
    [
        ("F2", "not a safetensors dtype"),
        ("f32", "not a safetensors dtype"),
        ("F6_E2M3", "no torch dtype"),
        ("F6_E3M2", "no torch dtype"),
    ],
)
def test_unknown_and_unmapped_dtypes_are_named(tmp_path: Path, dtype: str, message: str) -> None:
    path = tmp_path / "x.safetensors"
    entry = {"dtype": dtype, "shape": [4], "data_offsets": [0, 3]}
    path.write_bytes(_file({"w": entry}, b"\0" * 3))
    with pytest.raises(Exception):  # noqa: B017 - safetensors refuses them too
        st.load_file(str(path))
    with pytest.raises(ckptio.CheckpointError, match=message) as info:
        ckptio.load(path)
    assert f"'{dtype}'" in str(info.value) and "'w'" in str(info.value)
