"""The load's C hot paths (csrc/bindings/register_unpickle.cpp): _core.pickling.StorageSlicer, the
persistent_load of storages that are slices of one base storage, and _core.pickling.fast_rebuild_v2,
torch's _rebuild_tensor_v2 for CPU storages that cannot grow.

Both do only the common case and hand everything else to the Python function they were built
over. The tests check that the common case is what they take on real loads, that what they
build is what the Python path builds (and torch.load), and that every unusual input reaches
the fallback.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptio
from ckptio import _core, _storage_types, _unpickler

from conftest import V3_DTYPE, assert_same, assert_same_sharing

_TypedStorage = torch.storage.TypedStorage


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(11)
    out: dict[str, Any] = {}
    for i, dtype in enumerate((torch.float32, torch.float16, torch.int64, torch.bool)):
        out[f"w{i}"] = torch.randint(0, 9, (7, 5), generator=g).to(dtype)
    out["view"] = out["w0"][2:, 1:]  # a view: offset and strides
    out["tied"] = out["w1"]
    out["t"] = out["w2"].t()
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.empty(0, 3)
    out["big"] = torch.arange(300_000, dtype=torch.float32)  # above the small-storage limit
    out["v3"] = torch.arange(6).to(V3_DTYPE)  # rebuilt by _rebuild_tensor_v3
    return out


def _python_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes loads take the Python functions the C paths fall back to."""
    monkeypatch.setattr(
        _unpickler.StorageLoader, "unpickler_hook", lambda self: self.persistent_load
    )
    monkeypatch.setattr(_core.pickling, "fast_rebuild_v2", lambda fallback, *_args: fallback)


@pytest.mark.parametrize("mmap", [False, True], ids=["eager", "mmap"])
def test_c_paths_build_what_the_python_paths_and_torch_build(
    tmp_path: Path, mmap: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.pt"
    torch.save(_state(), path)
    fast = ckptio.load(path, mmap=mmap)
    theirs = torch.load(path, mmap=mmap)
    with monkeypatch.context() as m:
        _python_paths(m)
        slow = ckptio.load(path, mmap=mmap)
    for other in (slow, theirs):
        assert_same(fast, other)
        assert_same_sharing(fast, other)
    for name, t in fast.items():
        for ref in (slow[name], theirs[name]):
            s, r = t.untyped_storage(), ref.untyped_storage()
            assert (s.nbytes(), s.resizable(), s.device) == (r.nbytes(), r.resizable(), r.device)
            assert t._backward_hooks == ref._backward_hooks, name
            assert type(t._backward_hooks) is type(ref._backward_hooks), name


@pytest.mark.parametrize("mmap", [False, True], ids=["eager", "mmap"])
def test_real_loads_take_the_c_paths(
    tmp_path: Path, mmap: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.pt"
    state = {f"t{i}": torch.full((4 + i,), float(i)) for i in range(50)}
    ckptio.save(state, path)
    slow_ids: list[Any] = []
    original = _unpickler.StorageLoader.persistent_load

    def spy(self: _unpickler.StorageLoader, saved_id: Any) -> Any:
        slow_ids.append(saved_id)
        return original(self, saved_id)

    monkeypatch.setattr(_unpickler.StorageLoader, "persistent_load", spy)
    rebuilt: list[int] = []

    def counting(fallback: Any, *args: Any) -> Any:
        def python_rebuild(*a: Any) -> Any:
            rebuilt.append(1)
            return fallback(*a)

        return _core_fast_rebuild(python_rebuild, *args)

    _core_fast_rebuild = _core.pickling.fast_rebuild_v2
    monkeypatch.setattr(_core.pickling, "fast_rebuild_v2", counting)
    out = ckptio.load(path, mmap=mmap)
    assert_same(out, state)
    # The first storage makes the base (the mapping, or the block read in the background)
    # and arms the slicer; every later one is sliced in C.
    assert len(slow_ids) == 1
    assert rebuilt == []


def _total(t: torch.Tensor) -> tuple[str, float]:
    return ("total", float(t.sum()))  # reads the storage's data while unpickling


class _Summed:
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def __reduce__(self) -> Any:
        return (_total, (self.t,))


@pytest.mark.parametrize("mmap", [False, True], ids=["eager", "mmap"])
def test_a_data_reading_global_disarms_the_slicer(
    tmp_path: Path, mmap: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the pickle names a global that may read storage data, every later storage goes
    through the Python path, which reads it before anything sees it."""
    path = tmp_path / "m.pt"
    state = {"a": torch.arange(4.0), "s": _Summed(torch.arange(1000.0)), "b": torch.ones(3)}
    torch.save(state, path)
    seen: list[str] = []
    original = _unpickler.StorageLoader.persistent_load

    def spy(self: _unpickler.StorageLoader, saved_id: Any) -> Any:
        seen.append(saved_id[2])
        return original(self, saved_id)

    monkeypatch.setattr(_unpickler.StorageLoader, "persistent_load", spy)
    with torch.serialization.safe_globals([_total]):
        out = ckptio.load(path, mmap=mmap)
    assert out["s"] == ("total", 499500.0)
    assert_same(out["a"], state["a"])
    assert_same(out["b"], state["b"])
    assert seen == ["0", "1", "2"]  # the first arms the slicer; _total disarms it


# -- StorageSlicer, called directly ---------------------------------------------------------
class _Recorder:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def __call__(self, saved_id: Any) -> str:
        self.calls.append(saved_id)
        return "fallback"


def _slicer(
    records: dict[str, tuple[int, int, int]] | None = None,
    offsets: dict[str, int] | None = None,
) -> tuple[Any, _Recorder, torch.UntypedStorage, dict[str, Any]]:
    base = torch.arange(64, dtype=torch.uint8).untyped_storage()
    recorder = _Recorder()
    loaded: dict[str, Any] = {}
    slicer = _core.pickling.StorageSlicer(
        recorder,
        records if records is not None else {"data/0": (8, 8, 0), "data/1": (16, 4, 0)},
        {torch.FloatStorage: (torch.float32, 4), torch.UntypedStorage: (torch.uint8, 1)},
        {"cpu"},
        loaded,
        _unpickler._slice,
        _TypedStorage,
    )
    slicer.base = base
    slicer.offsets = offsets
    return slicer, recorder, base, loaded


def test_slicer_slices_and_shares() -> None:
    slicer, recorder, _base, loaded = _slicer()
    typed = slicer(("storage", torch.FloatStorage, "0", "cpu", 2))
    assert type(typed) is _TypedStorage and typed.dtype == torch.float32
    assert typed._untyped_storage.tolist() == list(range(8, 16))
    assert not typed._untyped_storage.resizable()
    by_constructor = _storage_types.typed_storage_by_constructor
    assert typed.__dict__ == by_constructor(typed._untyped_storage, torch.float32).__dict__
    assert loaded == {"0": typed}
    assert slicer(("storage", torch.FloatStorage, "0", "cpu", 2)) is typed  # a tie
    assert recorder.calls == []


def test_slicer_uses_the_offsets_table_and_its_size_limit() -> None:
    slicer, recorder, _base, _loaded = _slicer(offsets={"0": 40, "1": 0})
    typed = slicer(("storage", torch.UntypedStorage, "0", "cpu", 8))
    assert typed._untyped_storage.tolist() == list(range(40, 48))
    slicer.limit = 4  # record 1 holds 4 bytes: no longer small
    sid = ("storage", torch.UntypedStorage, "1", "cpu", 4)
    assert slicer(sid) == "fallback"
    assert recorder.calls == [sid]


@pytest.mark.parametrize(
    "saved_id",
    [
        "storage",  # not a tuple
        ("storage", torch.FloatStorage, "0", "cpu"),  # four items
        ("storagex", torch.FloatStorage, "0", "cpu", 2),  # wrong tag
        (b"storage", torch.FloatStorage, "0", "cpu", 2),  # bytes tag (protocol 2 from py2)
        ("storage", torch.FloatStorage, 0, "cpu", 2),  # key not a str
        ("storage", torch.FloatStorage, "0", b"cpu", 2),  # location not a str
        ("storage", torch.FloatStorage, "0", "cuda:0", 2),  # a location that moves it
        ("storage", torch.FloatStorage, "0", "cpu", -1),  # negative count
        ("storage", torch.FloatStorage, "0", "cpu", 0),  # empty: torch does not share those
        ("storage", torch.FloatStorage, "0", "cpu", True),  # a bool is not a count
        ("storage", torch.FloatStorage, "0", "cpu", 1 << 80),  # does not fit
        ("storage", torch.DoubleStorage, "0", "cpu", 1),  # type not yet in the table
        ("storage", [], "0", "cpu", 2),  # unhashable type
        ("storage", torch.FloatStorage, "0", "cpu", 3),  # size differs from the record's
        ("storage", torch.FloatStorage, "9", "cpu", 2),  # no such record
        ("storage", torch.FloatStorage, "2", "cpu", 1),  # stored compressed
    ],
)
def test_slicer_hands_anything_unusual_to_the_fallback(saved_id: Any) -> None:
    records = {"data/0": (8, 8, 0), "data/2": (24, 4, 8)}
    slicer, recorder, _base, loaded = _slicer(records)
    assert slicer(saved_id) == "fallback"
    assert recorder.calls == [saved_id]
    assert loaded == {}


def test_slicer_without_a_base_or_with_keywords_falls_back() -> None:
    slicer, recorder, _base, _loaded = _slicer()
    sid = ("storage", torch.FloatStorage, "0", "cpu", 2)
    slicer.base = None
    assert slicer(sid) == "fallback"
    with pytest.raises(TypeError):
        slicer(sid, extra=1)  # the fallback's own error for arguments it does not take
    assert recorder.calls == [sid]


def test_slicer_never_hands_out_a_short_slice() -> None:
    """A record reaching past the base (the archive reader refuses such files first) is not
    sliced short: it goes to the fallback."""
    sid = ("storage", torch.FloatStorage, "0", "cpu", 2)
    slicer, recorder, _base, loaded = _slicer({"data/0": (60, 8, 0)})
    assert slicer(sid) == "fallback"
    assert recorder.calls == [sid] and loaded == {}


# -- fast_rebuild_v2, called directly -------------------------------------------------------
def _rebuild(make_empty: Any = None) -> tuple[Any, list[tuple[Any, ...]]]:
    calls: list[tuple[Any, ...]] = []

    def fallback(*args: Any) -> str:
        calls.append(args)
        return "fallback"

    f = _core.pickling.fast_rebuild_v2(
        fallback,
        _TypedStorage,
        torch.UntypedStorage,
        make_empty or (lambda dtype: torch.empty((0,), dtype=dtype)),
        torch._utils.set_tensor_metadata,
        torch.device("cpu"),
    )
    return f, calls


def _fixed(nbytes: int, dtype: torch.dtype = torch.float32) -> Any:
    owner = torch.arange(nbytes, dtype=torch.uint8).untyped_storage()
    return _storage_types.typed_storage(_unpickler._slice(owner, slice(0, nbytes)), dtype)


def test_rebuild_builds_torchs_tensor() -> None:
    f, calls = _rebuild()
    storage = _fixed(64)
    hooks: OrderedDict[int, Any] = OrderedDict()
    t = f(storage, 2, (2, 3), (1, 2), False, hooks)
    ref = torch._utils._rebuild_tensor_v2(storage, 2, (2, 3), (1, 2), False, OrderedDict())
    assert_same(t, ref)
    assert t.untyped_storage().data_ptr() == storage._untyped_storage.data_ptr()
    assert t._backward_hooks is hooks
    grad = f(_fixed(16), 0, (4,), (1,), True, OrderedDict())
    assert grad.requires_grad
    assert calls == []


def test_rebuild_sets_metadata() -> None:
    f, calls = _rebuild()
    storage = _fixed(16)
    # A conjugate-style bit torch records in the metadata dict.
    meta = torch._C._get_tensor_metadata(torch.zeros(1).neg().conj())  # type: ignore[attr-defined]
    t = f(storage, 0, (4,), (1,), False, OrderedDict(), meta)
    assert torch._C._get_tensor_metadata(t) == meta  # type: ignore[attr-defined]
    assert f(storage, 0, (4,), (1,), False, OrderedDict(), {}).shape == (4,)
    assert calls == []


@pytest.mark.parametrize(
    "case",
    ["resizable", "untyped", "not_storage", "five_args", "eight_args", "too_big", "bad_size"],
)
def test_rebuild_hands_anything_unusual_to_the_fallback(case: str) -> None:
    f, calls = _rebuild()
    storage = _fixed(16)
    args: tuple[Any, ...] = (storage, 0, (4,), (1,), False, OrderedDict())
    if case == "resizable":  # meta and device storages: Python checks the geometry first
        args = (_storage_types.typed_storage(torch.UntypedStorage(16), torch.float32), *args[1:])
    elif case == "untyped":
        args = (storage._untyped_storage, *args[1:])
    elif case == "not_storage":
        args = ("x", *args[1:])
    elif case == "five_args":
        args = args[:5]
    elif case == "eight_args":
        args = (*args, None, None)
    elif case == "too_big":  # set_ refuses: the Python rebuild says why
        args = (storage, 0, (5,), (1,), False, OrderedDict())
    elif case == "bad_size":
        args = (storage, 0, "4", (1,), False, OrderedDict())
    assert f(*args) == "fallback"
    assert calls == [args]


def test_rebuild_lets_keyboard_interrupt_through() -> None:
    def interrupted(_dtype: torch.dtype) -> Any:
        raise KeyboardInterrupt

    f, calls = _rebuild(interrupted)
    with pytest.raises(KeyboardInterrupt):
        f(_fixed(16), 0, (4,), (1,), False, OrderedDict())
    assert calls == []


def test_rebuild_failures_reach_the_python_rebuild_which_raises() -> None:
    """A failure after the tensor exists (requires_grad on an integer tensor) goes to the
    fallback too, and the Python rebuild raises torch's error."""
    f, calls = _rebuild()
    args = (_fixed(16, torch.int32), 0, (4,), (1,), True, OrderedDict())
    assert f(*args) == "fallback"
    assert calls == [args]
    checked = _unpickler._checked_rebuilds("f.pt")["torch._utils._rebuild_tensor_v2"]
    with pytest.raises(RuntimeError, match="floating point"):
        checked(*args)
    with pytest.raises(RuntimeError, match="floating point"):
        torch._utils._rebuild_tensor_v2(*args)


# -- plan_arena and read_into's base --------------------------------------------------------
def test_plan_arena_slots_small_records_in_order() -> None:
    records = {
        "data.pkl": (100, 50, 0),  # not a storage record
        "data/0": (4096, 100, 0),
        "data/1": (8192, 0, 0),  # empty: a slot of no bytes, nothing to read
        "data/2": (12288, 64, 8),  # compressed: a slot, but the loader reads it itself
        "data/3": (16384, 1 << 20, 0),  # not small
        "data/4": (20480, 65, 0),
        "version": (30000, 2, 0),
    }
    total, offsets, requests = _core.pickling.plan_arena(records, 1 << 20, 64)
    assert offsets == {"0": 0, "1": 128, "2": 128, "4": 192}
    assert total == 192 + 128
    assert list(memoryview(requests).cast("Q")) == [4096, 100, 0, 20480, 65, 192]
    with pytest.raises(ValueError, match="power of two"):
        _core.pickling.plan_arena(records, 1 << 20, 48)


def test_read_into_addresses_relative_to_a_base(tmp_path: Path) -> None:
    path = tmp_path / "bytes.bin"
    path.write_bytes(bytes(range(256)))
    block = torch.zeros(64, dtype=torch.uint8)
    requests = memoryview(
        _core.pickling.plan_arena({"data/a": (10, 5, 0), "data/b": (200, 3, 0)}, 64, 8)[2]
    )
    with _core.io.File.open(str(path), _core.io.FileMode.READ) as f:
        f.read_into(requests.cast("Q"), 2, 1 << 20, block.data_ptr())
    assert block[:5].tolist() == list(range(10, 15))
    assert block[8:11].tolist() == [200, 201, 202]
    assert block[5:8].tolist() == [0, 0, 0] and block[11:].sum() == 0


def test_slicer_with_deleted_attributes_falls_back() -> None:
    sid = ("storage", torch.FloatStorage, "0", "cpu", 2)
    for attribute in ("base", "offsets"):
        slicer, recorder, _base, _loaded = _slicer()
        delattr(slicer, attribute)
        assert slicer(sid) == "fallback"
        assert recorder.calls == [sid]
