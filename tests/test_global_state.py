"""Every load path leaves torch's global state as torch.load leaves it, on success and on
failure: the queue of sparse tensors awaiting torch's invariant check
(``torch._utils._sparse_tensors_to_validate``), the thread's
``torch.serialization._serialization_tls`` fields, the default dtype, grad mode, and the
garbage collector.

The queue matters most: ``load_into`` and ``open`` parse a file over meta placeholders, and a
meta sparse tensor left queued makes the next load of any file fail ("Cannot copy out of meta
tensor") whenever ``torch.sparse.check_sparse_tensor_invariants`` is on (always on torch 2.5).
"""

from __future__ import annotations

import gc
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed.checkpoint as dcp

import ckptio
import ckptio.dcp

from conftest import assert_same

_tls = torch.serialization._serialization_tls
_queue: list[Any] = torch._utils._sparse_tensors_to_validate


def _state() -> tuple[Any, ...]:
    return (
        _tls.map_location,
        _tls.skip_data,
        _tls.materialize_fake_tensors,
        [id(t) for t in _queue],
        torch.get_default_dtype(),
        torch.is_grad_enabled(),
        gc.isenabled(),
    )


def _sparse_obj() -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Sparse CSR tensor support is in beta"
        csr = torch.eye(4).to_sparse_csr()
    return {
        "coo": torch.eye(3).to_sparse(),
        "csr": csr,
        "dense": torch.arange(6.0),
    }


@pytest.fixture(autouse=True)
def _empty_queue() -> None:
    _queue.clear()  # one test's leftovers must not fail the next


def _assert_loads_alike(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].layout == b[k].layout and a[k].dtype == b[k].dtype
        assert torch.equal(a[k].to_dense(), b[k].to_dense())


@pytest.fixture
def sparse_path(tmp_path: Path) -> Path:
    p = tmp_path / "sparse.pt"
    torch.save(_sparse_obj(), p)
    return p


@pytest.fixture
def other_path(tmp_path: Path) -> Path:
    p = tmp_path / "other.pt"
    torch.save({"x": torch.ones(3), "s": torch.eye(2).to_sparse()}, p)
    return p


def _load_into(p: Path) -> Any:
    return ckptio.load_into({"dense": torch.zeros(6, dtype=torch.float32)}, p, strict=False)


def _open(p: Path) -> Any:
    with ckptio.open(p) as ck:
        return ck["dense"]


ENTRIES: dict[str, Callable[[Path], Any]] = {
    "load": ckptio.load,
    "load-mmap": lambda p: ckptio.load(p, mmap=True),
    "load-meta": lambda p: ckptio.load(p, map_location="meta"),
    "load_into": _load_into,
    "open": _open,
}


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_next_load_works_under_sparse_invariant_checks(
    sparse_path: Path, other_path: Path, entry: str
) -> None:
    with torch.sparse.check_sparse_tensor_invariants():
        before = _state()
        ENTRIES[entry](sparse_path)
        assert _state() == before
        _assert_loads_alike(torch.load(other_path), ckptio.load(other_path))
        ckptio.load_into({"x": torch.zeros(3)}, other_path, strict=False)
        _assert_loads_alike(torch.load(other_path), ckptio.load(other_path, mmap=True))
    assert _queue == []


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_loads_leave_the_state_as_it_was(sparse_path: Path, entry: str) -> None:
    before = _state()
    ENTRIES[entry](sparse_path)
    assert _state() == before


def _refuse_after(calls: int) -> Callable[[Any, str], Any]:
    """A map_location that fails at its `calls`+1-th storage: after the sparse tensors of
    _sparse_obj are rebuilt (and queued by torch's rebuild function)."""
    seen = [0]

    def restore(storage: Any, location: str) -> Any:
        seen[0] += 1
        if seen[0] > calls:
            raise KeyError("no room")
        return storage

    return restore


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("mmap", [False, True], ids=["eager", "mmap"])
def test_a_failed_load_leaves_the_state_clean(tmp_path: Path, mmap: bool, legacy: bool) -> None:
    if mmap and legacy:
        pytest.skip("legacy files cannot be mapped")
    p = tmp_path / "sparse.pt"
    torch.save(_sparse_obj(), p, _use_new_zipfile_serialization=not legacy)
    before = _state()
    with torch.sparse.check_sparse_tensor_invariants():
        with pytest.raises(KeyError, match="no room"):
            ckptio.load(p, map_location=_refuse_after(5), mmap=mmap)
        assert _queue == []
        assert _tls.map_location is None
        ckptio.load(p)  # the next load of the file works
    assert _state() == before


@pytest.mark.parametrize("entry", ["load_into", "open"])
def test_a_failed_parse_leaves_the_queue_clean(
    sparse_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str
) -> None:
    from ckptio import _unpickler

    real = _unpickler.PlaceholderLoader._storage
    calls = [0]

    def fail_late(self: Any, nbytes: int, key: str, location: str) -> Any:
        calls[0] += 1
        if calls[0] > 5:  # after the sparse tensors are rebuilt (and queued)
            raise RuntimeError("late failure")
        return real(self, nbytes, key, location)

    monkeypatch.setattr(_unpickler.PlaceholderLoader, "_storage", fail_late)
    before = _state()
    with pytest.raises(RuntimeError, match="late failure"):
        ENTRIES[entry](sparse_path)
    assert _state() == before


def test_meta_loads_have_no_data_to_check(sparse_path: Path) -> None:
    """torch.load(map_location="meta") fails torch's own sparse check ("Cannot copy out of
    meta tensor"): the file is not at fault, and ckptio skips the check of data it has not."""
    with torch.sparse.check_sparse_tensor_invariants():
        ours = ckptio.load(sparse_path, map_location="meta")
    assert ours["coo"].is_meta and ours["coo"].layout == torch.sparse_coo
    assert _queue == []


def test_map_location_is_visible_during_the_load_as_in_torch(tmp_path: Path) -> None:
    """torch's rebuild helpers (_rebuild_wrapper_subclass...) read map_location from the
    thread's serialization state while a load runs; it is cleared afterwards."""
    p = tmp_path / "m.pt"
    torch.save({"t": torch.ones(2)}, p)
    seen: dict[str, Any] = {}

    def make(name: str) -> Callable[[Any, str], Any]:
        def restore(storage: Any, location: str) -> Any:
            seen[name] = _tls.map_location
            return storage

        return restore

    torch_ml, ckptio_ml = make("torch"), make("ckptio")
    torch.load(p, map_location=torch_ml)
    ckptio.load(p, map_location=ckptio_ml)
    assert seen == {"torch": torch_ml, "ckptio": ckptio_ml}
    assert _tls.map_location is None


def test_nested_load_restores_the_outer_map_location(tmp_path: Path) -> None:
    p = tmp_path / "m.pt"
    torch.save({"t": torch.ones(2)}, p)
    _tls.map_location = "cpu"  # as an outer load in progress on this thread sets it
    try:
        ckptio.load(p)
        assert _tls.map_location == "cpu"
    finally:
        _tls.map_location = None


def test_default_dtype_and_grad_mode_are_left_alone(sparse_path: Path) -> None:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.no_grad():
            for entry in ENTRIES.values():
                before = _state()
                entry(sparse_path)
                assert _state() == before
            ours = ckptio.load(sparse_path)
        assert ours["dense"].dtype == torch.float32
    finally:
        torch.set_default_dtype(previous)


# A single-process save or load, in each torch's words (torch 2.5 has no "disabled, ").
@pytest.mark.filterwarnings(
    "ignore:torch.distributed is (disabled, )?unavailable or uninitialized:UserWarning"
)
def test_dcp_reader_leaves_the_state_as_it_was(tmp_path: Path) -> None:
    state = {"w": torch.arange(6.0), "extra": {"step": 3}}
    dcp.save(state, storage_writer=ckptio.dcp.Writer(tmp_path))
    target = {"w": torch.zeros(6), "extra": {"step": 0}}
    with torch.sparse.check_sparse_tensor_invariants():
        before = _state()
        dcp.load(target, storage_reader=ckptio.dcp.Reader(tmp_path))
        assert _state() == before
    assert_same(state, target)


# ------------------------------------------------------------------ the garbage collector
@pytest.fixture
def no_automatic_collections() -> Any:
    """Only the load moves objects between generations while a test runs."""
    thresholds = gc.get_threshold()
    gc.collect()
    gc.set_threshold(10**9)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)


def _in_oldest_generation(obj: object) -> bool:
    return any(o is obj for o in gc.get_objects(generation=2))


@pytest.mark.parametrize("entry", ["load", "load-mmap", "load_into", "open"])
def test_a_load_leaves_no_full_collection_owed(
    tmp_path: Path, no_automatic_collections: None, entry: str
) -> None:
    """The collector is paused while a file is unpickled; on resuming, what the load made is
    in the oldest generation, as if it had lived through the collections the pause skipped:
    no full collection falls due at the program's next allocations."""
    p = tmp_path / "m.pt"
    torch.save({"dense": torch.arange(6.0), "w": [torch.ones(2), {"b": torch.zeros(1)}]}, p)
    young = []  # the caller's objects made since the last collection move with them
    assert gc.get_freeze_count() == 0 and not _in_oldest_generation(young)
    result = ENTRIES[entry](p)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert gc.get_count()[0] < 50  # the young generation holds (almost) nothing
    assert _in_oldest_generation(young)
    if entry != "open":  # open returns a tensor read after the handle's parse
        assert _in_oldest_generation(result)
    if entry == "load":
        assert all(_in_oldest_generation(x) for x in (result["w"], result["w"][1]))


def test_a_failed_load_leaves_its_objects_young(
    tmp_path: Path, no_automatic_collections: None
) -> None:
    """What a failed load made is garbage (some in cycles through the traceback): it stays
    for the next young collection, not the next full one."""
    p = tmp_path / "sparse.pt"
    torch.save(_sparse_obj(), p)
    made: list[list[int]] = []
    refuse = _refuse_after(2)

    def restore(storage: Any, location: str) -> Any:
        made.append([1])  # an object the load makes
        return refuse(storage, location)

    with pytest.raises(KeyError, match="no room"):
        ckptio.load(p, map_location=restore)
    assert gc.isenabled() and len(made) == 3
    assert not any(_in_oldest_generation(m) for m in made)


def test_objects_the_caller_froze_stay_frozen(
    tmp_path: Path, no_automatic_collections: None
) -> None:
    p = tmp_path / "m.pt"
    torch.save({"t": torch.ones(2)}, p)
    gc.freeze()
    frozen = gc.get_freeze_count()
    try:
        young = []
        result = ckptio.load(p)
        assert gc.get_freeze_count() == frozen
        assert not _in_oldest_generation(young) and not _in_oldest_generation(result)
    finally:
        gc.unfreeze()


def test_a_save_leaves_the_collector_as_it_was(
    tmp_path: Path, no_automatic_collections: None
) -> None:
    gc.disable()
    try:
        ckptio.save({"t": torch.ones(2)}, tmp_path / "s.pt")
        assert not gc.isenabled()
    finally:
        gc.enable()
    ckptio.save({"t": torch.ones(2)}, tmp_path / "s.pt")
    assert gc.isenabled() and gc.get_freeze_count() == 0
