"""safetensors interop, with the safetensors package as the oracle in both directions: every
dtype it supports, byte-identical files, every load strategy, hostile headers and the save
refusals."""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

import ckptio
from ckptio import _safetensors

from conftest import assert_tensor_same

st = pytest.importorskip("safetensors.torch")

DTYPES = sorted(_safetensors.DTYPES.items())
# Two F4 values packed in a byte: torch has no arithmetic or copy for it, only views.
F4 = getattr(torch, "float4_e2m1fn_x2", None)


def _values(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == F4:
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).view(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point or dtype.is_complex:
        wide = torch.complex64 if dtype.is_complex else torch.float32
        return (torch.randn(shape, generator=g, dtype=wide) * 8).to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2**31)), min(info.max, 2**31 - 1)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dtype)


def _all_dtypes_dict() -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, (name, dtype) in enumerate(DTYPES):
        out[f"w.{name}"] = _values(dtype, (5, 3), seed=i)
        if dtype != F4:  # a 0-d F4 tensor has no safetensors shape (both writers refuse it)
            out[f"s.{name}"] = _values(dtype, (), seed=100 + i)
        out[f"e.{name}"] = _values(dtype, (0, 4), seed=200 + i)
    out["same.b"] = torch.ones(2, 2)
    out["same.a"] = torch.zeros(2, 2)
    return out


def _assert_same_dict(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        if a[k].dtype == F4 or b[k].dtype == F4:
            assert a[k].dtype == b[k].dtype, k
            assert_tensor_same(a[k].view(torch.uint8), b[k].view(torch.uint8), k)
        else:
            assert_tensor_same(a[k], b[k], k)


@pytest.mark.parametrize(("name", "dtype"), DTYPES, ids=[n for n, _ in DTYPES])
def test_each_dtype_roundtrips_both_ways(tmp_path: Path, name: str, dtype: torch.dtype) -> None:
    t = {"x": _values(dtype, (7, 2)), "y": _values(dtype, (3,), seed=1)}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    ckptio.save(t, ours, format="safetensors")
    st.save_file(t, str(theirs))
    assert ours.read_bytes() == theirs.read_bytes()
    _assert_same_dict(st.load_file(str(ours)), ckptio.load(theirs))
    assert json.loads(theirs.read_bytes()[8:].split(b"}}", 1)[0] + b"}}")["x"]["dtype"] == name


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}], ids=["no-metadata", "metadata"])
def test_save_is_byte_identical_to_safetensors(tmp_path: Path, metadata: Any) -> None:
    tensors = _all_dtypes_dict()
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    ckptio.save(tensors, ours, format="safetensors", metadata=metadata)
    st.save_file(tensors, str(theirs), metadata=metadata)
    assert ours.read_bytes() == theirs.read_bytes()
    # to a file object (sequential writes) too
    buf = io.BytesIO()
    ckptio.save(tensors, buf, format="safetensors", metadata=metadata)
    assert buf.getvalue() == theirs.read_bytes()
    n = struct.unpack("<Q", theirs.read_bytes()[:8])[0]
    assert n % 8 == 0  # the header is padded with spaces to a multiple of 8


def test_staged_device_tensors_save_through_the_ring(tmp_path: Path, cpu_ring: list[Any]) -> None:
    """Tensors on a staged device (CUDA on a GPU host; the CPU stands in through the
    copier_for hook) stream out through the pinned ring, views at an offset included, to a
    path and to a file object, byte for byte what safetensors writes."""
    tensors = _all_dtypes_dict()
    base = torch.arange(1000, dtype=torch.float32)
    tensors["tail"] = base[300:]  # contiguous, at an offset into a larger storage
    theirs = tmp_path / "theirs.safetensors"
    st.save_file(tensors, str(theirs))
    ours = tmp_path / "ours.safetensors"
    buf = io.BytesIO()
    ckptio.save(tensors, ours, format="safetensors")
    ckptio.save(tensors, buf, format="safetensors")
    assert sum(c.allocated for c in cpu_ring) > 0  # the ring carried the bytes
    assert ours.read_bytes() == theirs.read_bytes()
    assert buf.getvalue() == theirs.read_bytes()


def test_many_metadata_keys_survive(tmp_path: Path) -> None:
    meta = {f"k{i}": f"value {i} ü" for i in range(20)}
    path = tmp_path / "m.safetensors"
    ckptio.save({"a": torch.ones(3)}, path, format="safetensors", metadata=meta)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata() == meta
    with ckptio.open(path) as h:
        assert h.metadata == meta


@pytest.mark.parametrize("strategy", ["eager", "mmap", "file-object", "bytesio", "meta"])
def test_load_matches_safetensors(tmp_path: Path, strategy: str) -> None:
    tensors = _all_dtypes_dict()
    path = tmp_path / "m.safetensors"
    st.save_file(tensors, str(path), metadata={"a": "b"})
    expected = st.load_file(str(path))
    if strategy == "eager":
        got = ckptio.load(path)
    elif strategy == "mmap":
        got = ckptio.load(path, mmap=True)
    elif strategy == "file-object":
        with open(path, "rb") as f:
            got = ckptio.load(f)
    elif strategy == "bytesio":
        got = ckptio.load(io.BytesIO(path.read_bytes()))
    else:
        got = ckptio.load(path, map_location="meta")
        assert all(t.device.type == "meta" for t in got.values())
        assert [(k, t.dtype, t.shape) for k, t in got.items()] == [
            (k, t.dtype, t.shape) for k, t in expected.items()
        ]
        return
    _assert_same_dict(expected, got)


def test_mmap_views_one_mapping(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    st.save_file({"a": torch.arange(1000.0), "b": torch.arange(10)}, str(path))
    got = ckptio.load(path, mmap=True)
    a, b = got["a"], got["b"]
    # zero-copy: the tensors lie in one mapping, at their file offsets
    header = _safetensors.read_header(
        ckptio._core.io.File.open(str(path), ckptio._core.io.FileMode.READ)
    )
    offsets = {t.name: t.offset for t in header.tensors}
    assert a.data_ptr() - b.data_ptr() == offsets["a"] - offsets["b"]
    a[0] = 42.0  # copy-on-write: the file is unchanged
    assert st.load_file(str(path))["a"][0] == 0.0


@pytest.mark.parametrize(
    "map_location",
    ["cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda s, loc: s],
    ids=["str", "device", "dict", "callable"],
)
def test_map_location(tmp_path: Path, map_location: Any) -> None:
    path = tmp_path / "m.safetensors"
    st.save_file({"a": torch.arange(6.0).reshape(2, 3)}, str(path))
    assert torch.equal(
        ckptio.load(path, map_location=map_location)["a"], torch.arange(6.0).reshape(2, 3)
    )


def test_map_location_callable_sees_cpu_location(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    st.save_file({"a": torch.ones(2), "b": torch.zeros(3)}, str(path))
    seen = []

    def loc(storage: Any, location: str) -> Any:
        seen.append((location, storage.nbytes()))
        return storage

    ckptio.load(path, map_location=loc)
    assert sorted(seen) == [("cpu", 8), ("cpu", 12)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_load_to_cuda(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    tensors = {"a": torch.randn(100, 10), "b": torch.arange(7)}
    st.save_file(tensors, str(path))
    got = ckptio.load(path, map_location="cuda")
    assert all(t.is_cuda for t in got.values())
    ref = st.load_file(str(path), device="cuda")
    assert all(torch.equal(got[k], ref[k]) for k in tensors)


def test_detection_is_by_bytes_not_extension(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    st.save_file({"a": torch.ones(3)}, str(path))
    assert torch.equal(ckptio.load(path)["a"], torch.ones(3))
    other = tmp_path / "model.safetensors"
    ckptio.save({"a": torch.ones(3)}, other)  # torch format despite the name
    # (torch.load itself goes by the extension and would hand this file to safetensors)
    assert torch.equal(ckptio.load(other)["a"], torch.ones(3))


# ---------------------------------------------------------------------------- hostile files
def _file(
    header: Any, data: bytes = b"", *, raw: bytes | None = None, n: int | None = None
) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if n is None else n) + text + data


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (_file(GOOD, b"\0" * 8, n=1 << 40), "header length"),
        (_file(GOOD, b"\0" * 8, n=200_000_000), "header length"),
        (
            _file(None, b"\0" * 8, raw=b'{"a": {"dtype": "F32", "shape": [2], "data_o'),
            "not valid JSON",
        ),
        (_file(None, raw=b'{"a": 1, "a": 2}'), "the key 'a' appears twice"),
        (_file(None, raw=b"{\xff\xfe}"), "not valid JSON"),
        (_file({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "dtype"),
        (_file({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8), "shape"),
        (
            _file({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, b"\0" * 8),
            "shape",
        ),
        (
            _file({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
            "needs 12",
        ),
        (
            _file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8),
            "invalid data_offsets",
        ),
        (
            _file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
            "cover 8 bytes of a 4",
        ),
        (
            _file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12),
            "cover 8 bytes of a 12",
        ),
        (
            _file(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                b"\0" * 12,
            ),
            "overlaps",
        ),
        (
            _file(
                {
                    "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
                },
                b"\0" * 12,
            ),
            "gap",
        ),
        (_file({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "exactly"),
        (_file({"__metadata__": {"k": 1}, **GOOD}, b"\0" * 8), "__metadata__"),
        (_file(None, raw=b"[1, 2]"), "does not start"),
    ],
    ids=[
        "length-past-file",
        "length-over-limit",
        "truncated-json",
        "duplicate-key",
        "not-utf8",
        "unknown-dtype",
        "negative-dim",
        "float-dim",
        "shape-size-mismatch",
        "reversed-offsets",
        "data-truncated",
        "trailing-data",
        "overlap",
        "gap",
        "missing-field",
        "bad-metadata",
        "not-an-object",
    ],
)
def test_hostile_headers_raise_checkpoint_error(tmp_path: Path, blob: bytes, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    # Files that do not even start like safetensors are "not a checkpoint"; the others name
    # the problem.
    with pytest.raises(ckptio.CheckpointError) as info:
        if _safetensors.looks_like_safetensors(blob[:9], len(blob)):
            ckptio.load(path)
        else:
            src = ckptio._core.io.File.open(str(path), ckptio._core.io.FileMode.READ)
            _safetensors.read_header(src)
    assert message in str(info.value)
    assert ckptio.CheckpointError is not None
    if _safetensors.looks_like_safetensors(blob[:9], len(blob)):
        with pytest.raises(Exception):  # noqa: B017 - the oracle refuses it too, in its own way
            st.load_file(str(path))


def test_deeply_nested_json(tmp_path: Path) -> None:
    path = tmp_path / "deep.safetensors"
    path.write_bytes(_file(None, raw=b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"))
    with pytest.raises(ckptio.CheckpointError):
        ckptio.load(path)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    edits=hs.lists(hs.tuples(hs.integers(8, 10**6), hs.integers(0, 255)), min_size=1, max_size=4)
)
def test_mutated_files_load_or_raise_checkpoint_error(tmp_path: Path, edits: Any) -> None:
    """Byte edits anywhere after the length field: ckptio either refuses the file with
    CheckpointError or loads exactly what the reference implementation loads."""
    tensors = {"w": torch.arange(12.0).reshape(3, 4), "i": torch.arange(5, dtype=torch.int16)}
    blob = bytearray(st.save(tensors, metadata={"m": "x"}))
    for at, value in edits:
        blob[at % len(blob) if at % len(blob) >= 8 else 8] = value
    path = tmp_path / "mutated.safetensors"
    path.write_bytes(bytes(blob))
    try:
        got = ckptio.load(path)
    except ckptio.CheckpointError:
        return
    ref = st.load_file(str(path))
    assert list(got) == list(ref)
    for k in ref:
        assert_tensor_same(got[k], ref[k], k)


def test_truncation_sweep_never_crashes(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    st.save_file({"a": torch.arange(10.0), "b": torch.ones(3, dtype=torch.int8)}, str(path))
    blob = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    for n in range(len(blob)):
        cut.write_bytes(blob[:n])
        with pytest.raises(ckptio.CheckpointError):
            ckptio.load(cut)


# ------------------------------------------------------------------------------- save errors
def test_shared_tensors_are_refused_naming_the_keys(tmp_path: Path) -> None:
    w = torch.randn(4, 4)
    with pytest.raises(ValueError, match="'lm_head.weight', 'wte.weight'"):
        ckptio.save(
            {"wte.weight": w, "lm_head.weight": w, "b": torch.ones(2)},
            tmp_path / "x.safetensors",
            format="safetensors",
        )
    # the oracle refuses them too
    with pytest.raises(RuntimeError):
        st.save_file({"wte.weight": w, "lm_head.weight": w}, str(tmp_path / "y.safetensors"))
    assert not list(tmp_path.iterdir())  # nothing written, no temporary left


def test_overlapping_views_are_shared_but_disjoint_ones_are_not(tmp_path: Path) -> None:
    base = torch.arange(20.0)
    with pytest.raises(ValueError, match="share memory"):
        ckptio.save(
            {"a": base[:10], "b": base[5:15]}, tmp_path / "x.safetensors", format="safetensors"
        )
    path = tmp_path / "ok.safetensors"
    ckptio.save({"a": base[:10], "b": base[10:]}, path, format="safetensors")
    got = st.load_file(str(path))
    assert torch.equal(got["a"], base[:10]) and torch.equal(got["b"], base[10:])


def test_clone_shared_stores_independent_copies(tmp_path: Path) -> None:
    w = torch.randn(4, 4)
    path = tmp_path / "x.safetensors"
    ckptio.save({"a": w, "b": w}, path, format="safetensors", clone_shared=True)
    got = st.load_file(str(path))
    assert torch.equal(got["a"], w) and torch.equal(got["b"], w)
    assert got["a"].data_ptr() != got["b"].data_ptr()


@pytest.mark.parametrize(
    ("obj", "error", "match"),
    [
        ([torch.ones(2)], TypeError, "flat dict"),
        ({"a": torch.ones(2), "step": 3}, TypeError, "'step'"),
        ({"a": {"b": torch.ones(2)}}, TypeError, "'a'"),
        ({1: torch.ones(2)}, TypeError, "1"),
        ({"a": torch.ones(4, 4).t()}, ValueError, "not contiguous"),
        ({"a": torch.ones(2, 2).to_sparse()}, ValueError, "to_dense"),
        ({"a": torch.ones(2, device="meta")}, ValueError, "meta"),
        ({"__metadata__": torch.ones(2)}, ValueError, "reserved"),
        ({"a": torch.ones(2, dtype=torch.complex128)}, ValueError, "complex128"),
    ],
    ids=[
        "list",
        "int-value",
        "nested",
        "int-key",
        "non-contiguous",
        "sparse",
        "meta",
        "reserved-name",
        "unsupported-dtype",
    ],
)
def test_save_refusals(tmp_path: Path, obj: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        ckptio.save(obj, tmp_path / "x.safetensors", format="safetensors")
    assert not os.listdir(tmp_path)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="metadata"):
        ckptio.save({"a": torch.ones(1)}, tmp_path / "x", format="safetensors", metadata={"k": 1})
    with pytest.raises(ValueError, match="format"):
        ckptio.save({"a": torch.ones(1)}, tmp_path / "x", format="numpy")
    with pytest.raises(ValueError, match="only to format='safetensors'"):
        ckptio.save({"a": torch.ones(1)}, tmp_path / "x", metadata={"k": "v"})


def test_parameters_and_requires_grad_are_saved_as_data(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "m.safetensors"
    ckptio.save(dict(model.named_parameters()), path, format="safetensors")
    got = st.load_file(str(path))
    assert torch.equal(got["weight"], model.weight.detach())


def test_save_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    ckptio.save({"a": torch.ones(1000)}, path, format="safetensors")
    ckptio.save({"b": torch.zeros(3)}, path, format="safetensors")
    assert list(st.load_file(str(path))) == ["b"]
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_large_tensor_parallel_write(tmp_path: Path) -> None:
    tensors = {f"t{i}": _values(torch.float32, (256, 1024), seed=i) for i in range(6)}
    path, ref = tmp_path / "m.safetensors", tmp_path / "r.safetensors"
    with ckptio.options(threads=4, write_chunk_bytes=1 << 16):
        ckptio.save(tensors, path, format="safetensors")
    st.save_file(tensors, str(ref))
    assert path.read_bytes() == ref.read_bytes()
