"""ckptio.open: lazy listing and reading, torch.load / safetensors as the oracle, and proof (by
counting bytes read) that only the bytes needed are read."""

from __future__ import annotations

import collections
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

import ckptio

from conftest import assert_tensor_same, make_model

st = pytest.importorskip("safetensors.torch")


def _nested() -> dict[str, Any]:
    big = torch.arange(64 * 32, dtype=torch.float32).reshape(64, 32)
    return {
        "model": collections.OrderedDict(
            [
                ("layer.0.weight", torch.nn.Parameter(torch.randn(8, 4))),
                ("big", big),
                ("view", big[:, 3:9]),  # a view of part of a shared storage
                ("t", big.t()),
                ("half", torch.randn(3, 5).half()),
            ]
        ),
        "step": 7,
        "lr": 0.5,
        "history": [torch.ones(2, dtype=torch.int64), "note"],
        "empty": {},
    }


def _lookup(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


@pytest.fixture(params=["torch.save", "ckptio.save"])
def nested_file(request: Any, tmp_path: Path) -> tuple[Path, Any]:
    path = tmp_path / "nested.pt"
    obj = _nested()
    (torch.save if request.param == "torch.save" else ckptio.save)(obj, path)
    return path, torch.load(path)


def test_listing_without_reading(nested_file: tuple[Path, Any]) -> None:
    path, _ = nested_file
    with ckptio.open(path) as h:
        assert h.format == "torch"
        assert h.keys() == [
            "model.layer.0.weight",
            "model.big",
            "model.view",
            "model.t",
            "model.half",
            "history.0",
        ]
        assert h.paths()[0] == ("model", "layer.0.weight")
        assert h.non_tensors == {"step": 7, "lr": 0.5, "history.1": "note", "empty": {}}
        info = h.info("model.view")
        assert (info.dtype, info.shape, info.stride, info.storage_offset) == (
            torch.float32,
            (64, 6),
            (32, 1),
            3,
        )
        assert info.nbytes == 64 * 6 * 4
        assert info.storage == h.info("model.big").storage == h.info("model.t").storage
        assert h.info(("model", "layer.0.weight")).is_parameter
        assert "model.big" in h and ("model", "big") in h and "nope" not in h
        assert len(h) == 6


def test_every_tensor_matches_torch_load(nested_file: tuple[Path, Any]) -> None:
    path, expected = nested_file
    with ckptio.open(path) as h:
        for p in h.paths():
            got, ref = h[p], _lookup(expected, p)
            assert type(got) is type(ref) and got.dtype == ref.dtype and got.shape == ref.shape
            assert got.requires_grad == ref.requires_grad
            assert torch.equal(got, ref), p
            if p != ("model", "view"):  # dense in the file: saved strides kept
                assert got.stride() == ref.stride(), p
        all_at_once = h.get_tensors()
        assert list(all_at_once) == h.keys()
        assert torch.equal(all_at_once["model.t"], expected["model"]["t"])


@pytest.mark.parametrize(
    "index",
    [
        (slice(0, 10),),
        (slice(5, 6), slice(None)),
        (slice(None), slice(2, 5)),
        (Ellipsis, 0),
        (3,),
        (slice(1, 60, 7), slice(0, 32, 3)),
        (None, slice(2, 4)),
        (slice(60, 100),),
        (slice(10, 10),),
        (-1, -2),
    ],
    ids=[
        "rows",
        "one-row",
        "columns",
        "ellipsis",
        "int",
        "steps",
        "none",
        "past-end",
        "empty",
        "negative",
    ],
)
@pytest.mark.parametrize("name", ["model.big", "model.t", "model.view"])
def test_slices_match_indexing(nested_file: tuple[Path, Any], name: str, index: Any) -> None:
    path, expected = nested_file
    ref = _lookup(expected, tuple(name.split(".", 1)))
    with ckptio.open(path) as h:
        got = h.get_slice(name)[index]
    assert torch.equal(got, ref[index])
    assert got.dtype == ref.dtype


@settings(max_examples=60, deadline=None)
@given(data=hs.data())
def test_random_slices(tmp_path_factory: Any, data: Any) -> None:
    shape = data.draw(hs.lists(hs.integers(1, 6), min_size=1, max_size=4), label="shape")
    base = torch.arange(int(torch.tensor(shape).prod()), dtype=torch.int16).reshape(shape)
    perm = data.draw(hs.permutations(range(len(shape))), label="perm")
    t = base.permute(*perm)
    index = tuple(
        data.draw(
            hs.one_of(
                hs.builds(
                    slice,
                    hs.integers(-7, 7) | hs.none(),
                    hs.integers(-7, 7) | hs.none(),
                    hs.integers(1, 3) | hs.none(),
                ),
                hs.integers(-n, n - 1),
            ),
            label=f"dim{i}",
        )
        for i, n in enumerate(t.shape)
    )
    path = tmp_path_factory.mktemp("slices") / "t.pt"
    torch.save({"t": t}, path)
    with ckptio.open(path) as h:
        assert torch.equal(h.get_slice("t")[index], t[index])


def test_advanced_indexing_is_refused(nested_file: tuple[Path, Any]) -> None:
    path, _ = nested_file
    with ckptio.open(path) as h, pytest.raises(IndexError, match="get_tensor"):
        h.get_slice("model.big")[[0, 2]]


def test_ambiguous_dotted_names(tmp_path: Path) -> None:
    path = tmp_path / "amb.pt"
    torch.save({"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}}, path)
    with ckptio.open(path) as h:
        assert h.keys() == ["a.b"]
        assert h.paths() == [("a.b",), ("a", "b")]
        with pytest.raises(KeyError, match="ambiguous"):
            h["a.b"]
        assert torch.equal(h[("a", "b")], torch.zeros(1))
        assert torch.equal(h[("a.b",)], torch.ones(1))


def test_top_level_tensor_and_list(tmp_path: Path) -> None:
    path = tmp_path / "t.pt"
    torch.save(torch.arange(5), path)
    with ckptio.open(path) as h:
        assert h.paths() == [()] and h.keys() == [""]
        assert torch.equal(h[()], torch.arange(5))
    torch.save([torch.ones(1), torch.zeros(2)], path)
    with ckptio.open(path) as h:
        assert h.keys() == ["0", "1"]
        assert torch.equal(h[(1,)], torch.zeros(2))


def test_safetensors_handle_matches_safe_open(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = tmp_path / "m.safetensors"
    tensors = {"b.w": torch.randn(10, 6), "a": torch.arange(12, dtype=torch.int32).reshape(3, 4)}
    st.save_file(tensors, str(path), metadata={"format": "pt"})
    with ckptio.open(path) as h, safe_open(str(path), "pt") as ref:
        assert h.format == "safetensors"
        assert h.metadata == ref.metadata()
        assert sorted(h.keys()) == sorted(ref.keys())  # ours: header order
        assert h.non_tensors == {}
        for k in h.keys():
            assert_tensor_same(h[k], ref.get_tensor(k), k)
            assert h.get_slice(k).get_shape() == ref.get_slice(k).get_shape()
            assert torch.equal(h.get_slice(k)[1:3], ref.get_slice(k)[1:3])
            assert torch.equal(h.get_slice(k)[:, 1:3], ref.get_slice(k)[:, 1:3])


def test_state_dict_of_a_model(tmp_path: Path) -> None:
    model = make_model()
    path = tmp_path / "m.pt"
    ckptio.save(model.state_dict(), path)
    with ckptio.open(path) as h:
        assert h.keys() == list(model.state_dict())
        for k, v in model.state_dict().items():
            assert_tensor_same(h[k], v, k)


# ------------------------------------------------------------------------- bytes actually read
class _CountingFile:
    """Wraps the handle's _core.io.File and counts the bytes each read asks for."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self.bytes = 0

    def read_into(self, requests: Any, threads: int, chunk_bytes: int, base: int = 0) -> None:
        self.bytes += sum(requests[i + 1] for i in range(0, len(requests), 3))
        self._file.read_into(requests, threads, chunk_bytes, base)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def _rchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_only_needed_bytes_are_read(tmp_path: Path, fmt: str) -> None:
    big = torch.arange(2048 * 2048, dtype=torch.float32).reshape(2048, 2048)  # 16 MiB
    tensors = {"big": big, "small": torch.ones(16), "other": torch.randn(512, 512)}
    path = tmp_path / f"m.{fmt}"
    ckptio.save(tensors, path, format=fmt)
    file_size = path.stat().st_size
    row = 2048 * 4
    with ckptio.open(path) as h:  # warm up: first-use imports read .py files
        h.get_slice("small")[0:1]
    before = _rchar()
    with ckptio.open(path) as h:
        opened = _rchar() - before
        counting = _CountingFile(h._file)
        h._file = counting  # type: ignore[assignment]
        start = _rchar()
        rows = h.get_slice("big")[100:110]
        rows_read = _rchar() - start
        assert counting.bytes == 10 * row  # exactly the ten rows, one contiguous range
        assert torch.equal(rows, big[100:110])
        counting.bytes = 0
        start = _rchar()
        assert torch.equal(h["small"], torch.ones(16))
        small_read = _rchar() - start
        assert counting.bytes == 64
        counting.bytes = 0
        cols = h.get_slice("big")[:, 0:8]  # 2048 runs of 32 bytes, not the whole tensor
        assert counting.bytes == 2048 * 32
        assert torch.equal(cols, big[:, 0:8])
    # The OS agrees: opening reads the directory only, each read about what it asked for.
    slack = 256 << 10  # stray reads by the interpreter; the file is 20 MiB
    assert opened < slack, opened
    assert rows_read < 10 * row + slack, rows_read
    assert small_read < slack, small_read
    assert file_size > 16 << 20


def test_meta_map_location_reads_nothing(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    ckptio.save({"a": torch.randn(100, 100)}, path)
    with ckptio.open(path, map_location="meta") as h:
        counting = _CountingFile(h._file)
        h._file = counting  # type: ignore[assignment]
        t = h["a"]
        s = h.get_slice("a")[0:3]
        assert t.device.type == "meta" and t.shape == (100, 100)
        assert s.device.type == "meta" and s.shape == (3, 100)
        assert counting.bytes == 0


def test_map_location_callable_and_dict(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    ckptio.save({"a": torch.arange(4.0)}, path)
    seen: list[str] = []

    def where(storage: Any, location: str) -> Any:
        seen.append(location)
        return storage

    with ckptio.open(path, map_location=where) as h:
        assert torch.equal(h["a"], torch.arange(4.0))
    assert seen == ["cpu"]
    with ckptio.open(path, map_location={"cpu": "cpu"}) as h:
        assert torch.equal(h.get_slice("a")[1:3], torch.arange(1.0, 3.0))


# ------------------------------------------------------------------------------ concurrency
def test_concurrent_reads_from_many_threads(tmp_path: Path) -> None:
    tensors = {
        f"t{i}": torch.randn(300, 200, generator=torch.Generator().manual_seed(i)) for i in range(8)
    }
    path = tmp_path / "m.pt"
    ckptio.save(tensors, path)
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        try:
            barrier.wait()
            for j in range(20):
                k = f"t{(i + j) % 8}"
                lo = (i * 7 + j) % 250
                assert torch.equal(h.get_slice(k)[lo : lo + 50], tensors[k][lo : lo + 50])
                assert torch.equal(h[k], tensors[k])
        except BaseException as e:  # noqa: BLE001 - collected and re-raised in the main thread
            errors.append(e)

    with ckptio.open(path) as h:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]


def test_closed_handle_refuses_reads(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    ckptio.save({"a": torch.ones(3)}, path)
    h = ckptio.open(path)
    t = h["a"]
    h.close()
    assert h.closed
    with pytest.raises(ValueError, match="closed"):
        h["a"]
    assert torch.equal(t, torch.ones(3))  # what was read stays valid


# ------------------------------------------------------------------------------------ errors
def test_unsupported_files(tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.pt"
    torch.save({"a": torch.ones(1)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ckptio.CheckpointError, match="legacy"):
        ckptio.open(legacy)
    garbage = tmp_path / "g.pt"
    garbage.write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(ckptio.CheckpointError, match="neither"):
        ckptio.open(garbage)
    with pytest.raises(FileNotFoundError):
        ckptio.open(tmp_path / "missing.pt")
    with pytest.raises(TypeError, match="pread"):
        ckptio.open(__import__("io").BytesIO(b""))


class _Custom:
    pass


def test_unsafe_globals_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    torch.save({"obj": _Custom(), "a": torch.ones(1)}, path)
    with pytest.raises(ckptio.UnsafeGlobalError):
        ckptio.open(path)


def test_open_file_object(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    ckptio.save({"a": torch.arange(3)}, path)
    with open(path, "rb") as f, ckptio.open(f) as h:
        assert torch.equal(h["a"], torch.arange(3))


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_staged_map_location_streams_through_the_ring(
    tmp_path: Path, staged_cpu: list[Any], fmt: str
) -> None:
    """A map_location that sends storages to a staged device (CUDA on a GPU host; here the CPU
    stands in for it: the staged_cpu fixture) reads a handle's tensors straight into device
    memory through the pinned ring, as load does, with the same values, dtypes, shapes and
    strides as torch.load; the handle keeps one ring for all its reads and releases it when
    closed."""
    copiers = staged_cpu
    g = torch.Generator().manual_seed(5)
    base = torch.randn(64, 48, generator=g)
    sd = {
        "w": base,
        "bf16": torch.randn(300, generator=g).to(torch.bfloat16),
        "i64": torch.arange(7),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(2.5),
    }
    path = tmp_path / ("m.pt" if fmt == "torch" else "m.safetensors")
    if fmt == "torch":
        sd["t"] = base[:, 5:9].t()  # a strided view: read as its runs
        torch.save(sd, path)
    else:
        st.save_file(sd, str(path))
    with ckptio.open(path, map_location="cpu") as h:
        got = h.get_tensors()
        part = h.get_slice("w")[3:9, 2:5]
        (target,) = {id(t): t for t in h._placement._devices.values()}.values()
        assert target.ring is not None
    assert len(copiers) == 1, "one ring for the handle, every read through it"
    assert target.ring is None  # released with the handle
    for name, expected in sd.items():
        assert_tensor_same(got[name], expected.contiguous() if name == "t" else expected)
    assert_tensor_same(part, base[3:9, 2:5].contiguous())
