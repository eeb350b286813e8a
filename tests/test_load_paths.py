"""The load path's shortcuts: each must leave exactly what torch.load leaves.

* Loads create no reference cycles: dropping the result frees its tensors (and their memory)
  at once, not at the next full garbage collection.
* The shortcut that builds TypedStorage objects is only taken where it builds what the
  constructor builds.
* Many small storages (the arena and the directory reader's paths) load as torch loads them,
  and the freed arena and large storages are reused by the next load of the same shape
  (recycle_memory), within recycle_max_bytes.
* The background read of small storages (overlap_reads) gives the same result, is waited for
  before any code from the file can see a storage, raises its errors, and never outlives a
  load.
"""

from __future__ import annotations

import gc
import io
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch

import ckptio
from ckptio import _archive, _core, _storage_types, _unpickler

from conftest import assert_same, assert_same_sharing


def _many_small(n: int = 300) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    dtypes = (torch.float32, torch.float16, torch.int64, torch.bool)
    out: dict[str, torch.Tensor] = {}
    for i in range(n):
        numel = int(torch.randint(1, 2000, (1,), generator=g))
        t = torch.randint(0, 2, (numel,), generator=g).to(dtypes[i % 4])
        out[f"t{i}"] = t
    out["view"] = out["t0"][1:]  # shares t0's storage
    out["alias"] = out["t1"]
    return out


@pytest.mark.parametrize("mmap", [False, True], ids=["eager", "mmap"])
@pytest.mark.parametrize("weights_only", [True, False], ids=["weights_only", "full"])
def test_result_freed_without_gc(tmp_path: Path, mmap: bool, weights_only: bool) -> None:
    path = tmp_path / "m.pt"
    ckptio.save(_many_small(20), path)
    ckptio.load(path, mmap=mmap, weights_only=weights_only)  # first-use imports make garbage
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        sd = ckptio.load(path, mmap=mmap, weights_only=weights_only)
        ref = weakref.ref(sd["t3"])
        assert ref() is not None
        del sd
        assert ref() is None, "a reference cycle keeps the loaded tensors alive"
        # Nor anything else of the load (the loader holds every storage it made).
        assert gc.collect() == 0, "the load left reference cycles behind"
    finally:
        if was_enabled:
            gc.enable()


def test_typed_storage_shortcut_is_taken_and_exact() -> None:
    assert _storage_types.direct_construction_matches()
    assert _storage_types.typed_storage is _storage_types.typed_storage_direct
    storage = torch.UntypedStorage(8)
    fast = _storage_types.typed_storage(storage, torch.int16)
    ref = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.int16, _internal=True)
    assert type(fast) is type(ref)
    assert fast.__dict__ == ref.__dict__
    assert fast._size() == ref._size() == 4
    # Anything but a plain UntypedStorage goes through the constructor and its checks.
    with pytest.raises(TypeError):
        _storage_types.typed_storage(object(), torch.int16)


@pytest.mark.parametrize("mmap", [False, True], ids=["eager", "mmap"])
@pytest.mark.parametrize("writer", ["torch", "ckptio"])
def test_many_small_storages_match_torch(tmp_path: Path, mmap: bool, writer: str) -> None:
    sd = _many_small()
    path = tmp_path / "small.pt"
    (torch.save if writer == "torch" else ckptio.save)(sd, path)
    ours = ckptio.load(path, mmap=mmap)
    theirs = torch.load(path, mmap=mmap)
    assert_same(ours, theirs)
    assert_same_sharing(ours, theirs)
    assert_same(ours, sd)


def _small_block_start(sd: dict[str, torch.Tensor]) -> int:
    return min(t.untyped_storage().data_ptr() for t in sd.values() if t.numel())


@pytest.mark.parametrize("writer", ["torch", "ckptio"])
def test_freed_block_of_small_storages_is_reused(tmp_path: Path, writer: str) -> None:
    """recycle_memory: the next load of a file of the same shape gets the freed block back
    (no fresh memory to fault in), and overwrites all of it: values are torch.load's."""
    first_sd = {f"t{i}": torch.randn(4000) for i in range(300)}  # 16 KB each, 4.8 MB in all
    second_sd = {k: v + 1 for k, v in first_sd.items()}
    (torch.save if writer == "torch" else ckptio.save)(first_sd, tmp_path / "a.pt")
    (torch.save if writer == "torch" else ckptio.save)(second_sd, tmp_path / "b.pt")
    _core.io.drop_recycled()
    with ckptio.options(huge_pages=True, recycle_memory=True):
        first = ckptio.load(tmp_path / "a.pt")
        start = _small_block_start(first)
        assert start % (2 << 20) == 0  # a mapping of ckptio's own
        held = ckptio.load(tmp_path / "b.pt")  # while `first` lives: a block of its own
        assert _small_block_start(held) != start
        assert_same(held, second_sd)
        del first
        second = ckptio.load(tmp_path / "b.pt")
        assert _small_block_start(second) == start
        assert_same(second, second_sd)
        assert_same(second, torch.load(tmp_path / "b.pt"))
        del held, second
    with ckptio.options(huge_pages=True, recycle_memory=False):
        plain = ckptio.load(tmp_path / "a.pt")
        assert_same(plain, first_sd)
    # Kept: the blocks `held` and `second` had (the pool keeps both, well under its limit).
    assert _core.io.drop_recycled() > 0
    assert _core.io.drop_recycled() == 0


@pytest.mark.parametrize("idle", [0.0, 0.3, 3600.0], ids=["at-once", "0.3s", "1h"])
def test_recycled_blocks_are_marked_free_after_the_idle_setting(
    tmp_path: Path, idle: float
) -> None:
    """recycle_idle_seconds: a freed block stays as it was (dirty) for that long, then the
    background marker marks it MADV_FREE (lazy); either way the next load reuses it."""
    sd = {"big": torch.randn(1 << 20)}  # 4 MiB: a block of ckptio's own
    ckptio.save(sd, tmp_path / "m.pt")
    _core.io.drop_recycled()
    with ckptio.options(recycle_memory=True, recycle_idle_seconds=idle):
        loaded = ckptio.load(tmp_path / "m.pt")
        address = loaded["big"].data_ptr()
        del loaded
        if idle < 1:  # marked by the background thread once the idle time has passed
            deadline = time.monotonic() + 10
            while _core.io.recycled_stats()[1] == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
        else:
            time.sleep(0.5)
        dirty, lazy = _core.io.recycled_stats()
        if idle < 1:
            assert (dirty, lazy) == (0, 4 << 20)
        else:
            assert (dirty, lazy) == (4 << 20, 0)
        again = ckptio.load(tmp_path / "m.pt")
        assert again["big"].data_ptr() == address
        assert torch.equal(again["big"], sd["big"])
    del again
    assert _core.io.drop_recycled() == 4 << 20


def _large_starts(sd: dict[str, torch.Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in sd.values() if t.nbytes >= 2 << 20}


@pytest.mark.parametrize("writer", ["torch", "ckptio"])
def test_freed_large_storages_are_reused_within_the_limit(tmp_path: Path, writer: str) -> None:
    """recycle_memory: storages of 2 MiB or more are 2 MiB-aligned mappings of ckptio's own
    that the next load of a file of the same shape gets back, values overwritten; no more
    than recycle_max_bytes of them are kept."""
    mib = 1 << 20
    sizes = [2 * mib, 3 * mib + 4096, 5 * mib, 8 * mib]
    first_sd = {f"w{i}": torch.randn(n // 4) for i, n in enumerate(sizes)}
    first_sd["tied"] = first_sd["w3"][: mib // 4]  # a view of a large storage
    second_sd = {k: v * 2 for k, v in first_sd.items() if k != "tied"}
    second_sd["tied"] = second_sd["w3"][: mib // 4]
    save = torch.save if writer == "torch" else ckptio.save
    save(first_sd, tmp_path / "a.pt")
    save(second_sd, tmp_path / "b.pt")
    _core.io.drop_recycled()
    with ckptio.options(huge_pages=True, recycle_memory=True):
        first = ckptio.load(tmp_path / "a.pt")
        starts = _large_starts(first)
        assert len(starts) == len(sizes)
        assert all(start % (2 << 20) == 0 for start in starts)
        assert_same(first, first_sd)
        assert_same_sharing(first, first_sd)
        del first
        second = ckptio.load(tmp_path / "b.pt")
        assert _large_starts(second) == starts
        assert_same(second, second_sd)
        assert_same_sharing(second, second_sd)
        assert_same(second, torch.load(tmp_path / "b.pt"))
        del second
    kept = _core.io.drop_recycled()
    assert kept >= sum(sizes)
    # A limit below the load's blocks keeps the last freed that fit, never more.
    limit = 10 * mib
    with ckptio.options(huge_pages=True, recycle_memory=True, recycle_max_bytes=limit):
        third = ckptio.load(tmp_path / "a.pt")
        assert_same(third, first_sd)
        assert_same_sharing(third, first_sd)
        del third
    assert 0 < _core.io.drop_recycled() <= limit
    for off in ({"recycle_memory": False}, {"recycle_max_bytes": 0}):
        with ckptio.options(**off):
            plain = ckptio.load(tmp_path / "a.pt")
            assert_same(plain, first_sd)
            assert_same_sharing(plain, first_sd)
            del plain
        assert _core.io.drop_recycled() == 0, off
    # Without huge pages: mappings all the same, recycled.
    with ckptio.options(huge_pages=False):
        fourth = ckptio.load(tmp_path / "a.pt")
        starts = _large_starts(fourth)
        assert all(start % (2 << 20) == 0 for start in starts)
        del fourth
        fifth = ckptio.load(tmp_path / "b.pt")
        assert _large_starts(fifth) == starts
        assert_same(fifth, second_sd)
        del fifth
    assert _core.io.drop_recycled() >= sum(sizes)


def test_pickle_of_tensors_with_python_state_is_torchs(tmp_path: Path) -> None:
    """The fast reducer's state test (the tensor's __dict__) must send exactly the tensors
    torch pickles with state down torch's own path."""
    import zipfile

    stateful = torch.arange(4.0)
    stateful.note = "kept"  # type: ignore[attr-defined]
    probed = torch.arange(3)
    _ = probed.__dict__  # an empty __dict__ is no state
    objs = {"stateful": stateful, "probed": probed, "plain": torch.ones(2)}
    torch.save(objs, tmp_path / "t.pt")
    with ckptio.options(crc32=True):
        ckptio.save(objs, tmp_path / "c.pt")
    with zipfile.ZipFile(tmp_path / "t.pt") as zt, zipfile.ZipFile(tmp_path / "c.pt") as zc:
        assert zc.read("c/data.pkl") == zt.read("t/data.pkl")
    loaded = ckptio.load(tmp_path / "c.pt", weights_only=False)
    assert loaded["stateful"].note == "kept"


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ckptio-prefetch"]


def _count_prefetches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    started: list[int] = []
    original = _unpickler.StorageLoader._start_prefetch

    def spy(self: _unpickler.StorageLoader, arena: object, requests: object) -> None:
        started.append(1)
        original(self, arena, requests)  # type: ignore[arg-type]

    monkeypatch.setattr(_unpickler.StorageLoader, "_start_prefetch", spy)
    return started


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "after"])
@pytest.mark.parametrize("weights_only", [True, False], ids=["weights_only", "full"])
@pytest.mark.parametrize("writer", ["torch", "ckptio"])
@pytest.mark.parametrize("source", ["path", "bytesio"])
def test_overlapped_small_reads_match_torch(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    overlap: bool,
    weights_only: bool,
    writer: str,
    source: str,
) -> None:
    sd = _many_small(120)
    sd["big"] = torch.arange(300_000, dtype=torch.float32)  # its own block, read afterwards
    sd["empty"] = torch.zeros(0)
    path = tmp_path / "m.pt"
    (torch.save if writer == "torch" else ckptio.save)(sd, path)
    started = _count_prefetches(monkeypatch)
    f: object = path if source == "path" else io.BytesIO(path.read_bytes())
    with ckptio.options(overlap_reads=overlap):
        ours = ckptio.load(f, weights_only=weights_only)  # type: ignore[arg-type]
    assert len(started) == (1 if overlap else 0)
    theirs = torch.load(path, weights_only=weights_only)
    assert_same(ours, theirs)
    assert_same_sharing(ours, theirs)
    assert_same(ours, sd)
    assert not _prefetch_threads()


def _observed_sum(t: torch.Tensor) -> float:
    return float(t.double().sum())


class _SumProbe:
    """Unpickles to the sum of a tensor's values as seen while the pickle is being loaded."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def __reduce__(self) -> tuple[object, tuple[torch.Tensor]]:
        return (_observed_sum, (self.t,))


def test_code_from_the_file_sees_prefetched_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sd: dict[str, object] = dict(_many_small(200))
    probed = torch.arange(1.0, 513.0)
    sd["probe"] = _SumProbe(probed)  # unpickled after 200 small storages have been queued
    sd["after"] = torch.full((64,), 7.0)
    path = tmp_path / "p.pt"
    torch.save(sd, path)
    started = _count_prefetches(monkeypatch)
    loaded = ckptio.load(path, weights_only=False)
    assert started == [1]
    assert loaded["probe"] == float(probed.double().sum())
    assert_same(loaded["after"], sd["after"])
    assert_same({k: loaded[k] for k in _many_small(200)}, _many_small(200))


class _FailingSource:
    """A source whose parallel reads fail, as a vanishing disk would."""

    def __init__(self, source: object) -> None:
        self._source = source

    def __getattr__(self, name: str) -> object:
        return getattr(self._source, name)

    def read_into(self, *args: object) -> None:
        raise OSError(5, "injected read failure")


def test_background_read_errors_surface(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.pt"
    ckptio.save(_many_small(50), path)
    original = _archive.ArchiveReader.__init__

    def init(self: _archive.ArchiveReader, source: object, predict: bool = False) -> None:
        original(self, source, predict)  # type: ignore[arg-type]
        self.source = _FailingSource(self.source)  # type: ignore[assignment]

    monkeypatch.setattr(_archive.ArchiveReader, "__init__", init)
    started = _count_prefetches(monkeypatch)
    with pytest.raises(OSError, match="injected read failure"):
        ckptio.load(path)
    assert started == [1]
    assert not _prefetch_threads()


def test_failed_load_leaves_no_read_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sd: dict[str, object] = dict(_many_small(100))
    sd["refused"] = _SumProbe(torch.ones(3))  # a global weights-only loading refuses
    path = tmp_path / "r.pt"
    torch.save(sd, path)
    started = _count_prefetches(monkeypatch)
    with pytest.raises(ckptio.UnsafeGlobalError):
        ckptio.load(path)
    assert started == [1]
    assert not _prefetch_threads()
