"""The save pickler's hooks in C: the type dispatch (_core.pickling.dispatch_by_type) and the
common case of plain tensors and their storages (_core.pickling.tensor_reducer and
storage_ids), each checked against the Python function it stands for."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptio
from ckptio import _core, _pickler
from ckptio._storage_types import typed_storage

from conftest import V3_DTYPE, same_values


def test_dispatch_calls_the_function_of_the_exact_type_only() -> None:
    class Sub(int):
        pass

    seen: list[object] = []
    f = _core.pickling.dispatch_by_type({int: lambda x: seen.append(x) or ("int", x)}, "default")
    assert f(3) == ("int", 3)
    assert f(Sub(4)) == "default"  # subclasses are not their base
    assert f("s") == "default"
    assert f([1]) == "default"  # unhashable objects are fine: only their type is looked up
    assert seen == [3]


def test_dispatch_propagates_exceptions_and_reads_the_table_at_each_call() -> None:
    def boom(_x: object) -> None:
        raise ValueError("boom")

    table: dict[type, object] = {}
    f = _core.pickling.dispatch_by_type(table, None)
    assert f(1.5) is None
    table[float] = boom
    with pytest.raises(ValueError, match="boom"):
        f(1.5)


def test_a_pure_python_pickle_module_gets_the_same_hooks(tmp_path: Path) -> None:
    # The pure-Python pickler calls the hooks as attributes too.
    class PurePickle:
        Pickler = pickle._Pickler
        Unpickler = pickle._Unpickler

    sd = {"w": torch.randn(3, 4), "tied": None, "n": 7}
    sd["tied"] = sd["w"][1:]
    ckptio.save(sd, tmp_path / "a.pt", pickle_module=PurePickle)
    ckptio.save(sd, tmp_path / "b.pt")
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert torch.equal(a["w"], sd["w"]) and torch.equal(b["tied"], sd["tied"])
    assert a["tied"].untyped_storage().data_ptr() == a["w"].untyped_storage().data_ptr()
    assert b["n"] == a["n"] == 7


# -- the C forms of _reduce_plain_tensor and storage_id (_core.pickling.tensor_reducer, ...)
def _c_reducer(fallback: Any) -> Any:
    return _core.pickling.tensor_reducer(
        fallback,
        torch.strided,
        _pickler._FAST_DEVICE_FLAGS,
        _pickler._NEW_DTYPES,
        torch._utils._rebuild_tensor_v2,
        torch.storage.TypedStorage,
        _pickler._EmptyHooks,
        torch._C._get_tensor_metadata,  # type: ignore[attr-defined]
    )


def _plain_reduction(r: Any) -> Any:
    """A reduction with its TypedStorage and hooks stand-in replaced by comparable values."""
    func, args = r
    storage = args[0]
    return (
        func,
        (storage.dtype, storage._untyped_storage.data_ptr(), storage._untyped_storage.nbytes()),
        args[1:5],
        type(args[5]),
        args[6:],
    )


def test_c_hooks_are_the_ones_save_uses() -> None:
    assert _pickler._C_HOOKS
    assert type(_pickler._REDUCERS[torch.Tensor]) is type(_core.pickling.dispatch_by_type({}, None))


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(12.0).reshape(3, 4),
        lambda: torch.arange(12.0).reshape(3, 4).t(),  # strides
        lambda: torch.arange(12, dtype=torch.int64)[5:],  # storage offset
        lambda: torch.tensor(True),  # 0-d
        lambda: torch.empty(0, 3, dtype=torch.float16),
        lambda: torch.ones(3, requires_grad=True).detach().requires_grad_(),
        lambda: torch.zeros(2, dtype=torch.complex64).conj(),  # metadata: the conj bit
        lambda: torch.arange(4.0).neg().conj(),
    ],
    ids=["plain", "transposed", "offset", "0d", "empty", "requires_grad", "conj", "neg"],
)
def test_c_reducer_returns_what_the_python_reducer_returns(make: Any) -> None:
    t = make()
    calls: list[Any] = []
    c = _c_reducer(lambda x: calls.append(x) or NotImplemented)(t)
    py = _pickler._reduce_plain_tensor(t)
    assert calls == []
    assert _plain_reduction(c) == _plain_reduction(py)


def _with_hook() -> torch.Tensor:
    t = torch.ones(2, requires_grad=True)
    t.register_hook(lambda g: g)
    return t


def _with_state() -> torch.Tensor:
    t = torch.ones(2)
    t.note = 1  # type: ignore[attr-defined]
    return t


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.ones(2, 2).to_sparse(),
        lambda: torch.ones(2, device="meta"),
        lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8),
        lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
        _with_hook,
        _with_state,
        lambda: torch.arange(3).to(V3_DTYPE),  # _rebuild_tensor_v3
    ],
    ids=["sparse", "meta", "quantized", "nested", "hooks", "state", "v3_dtype"],
)
def test_c_reducer_hands_unusual_tensors_to_python(make: Any) -> None:
    with warnings.catch_warnings():  # quantized and nested tensors warn that they are new/old
        warnings.simplefilter("ignore")
        t = make()
    calls: list[Any] = []
    assert _c_reducer(lambda x: calls.append(x) or "python")(t) == "python"
    assert calls == [t]


def _c_ids() -> tuple[Any, dict[str, Any], list[Any]]:
    state: dict[str, Any] = {
        "storage_types": {torch.float32: (torch.FloatStorage, 4)},
        "locations": {torch.device("cpu"): "cpu"},
        "keys": {},
        "dtypes": {},
    }
    storages: list[Any] = []
    calls: list[Any] = []
    f = _core.pickling.storage_ids(
        lambda obj: calls.append(obj) or "python",
        torch.storage.TypedStorage,
        torch.UntypedStorage,
        state["storage_types"],
        state["locations"],
        state["keys"],
        storages,
        state["dtypes"],
    )
    state["calls"] = calls
    return f, state, storages


def _typed(t: torch.Tensor) -> Any:
    return typed_storage(t.untyped_storage(), t.dtype)


def test_c_storage_ids_key_storages_in_order_and_share_keys() -> None:
    f, state, storages = _c_ids()
    a, b = torch.ones(3), torch.zeros(5)
    assert f(_typed(a)) == ("storage", torch.FloatStorage, "0", "cpu", 3)
    assert f(_typed(b)) == ("storage", torch.FloatStorage, "1", "cpu", 5)
    assert f(_typed(a[1:])) == ("storage", torch.FloatStorage, "0", "cpu", 3)  # a view
    assert [s.data_ptr() for s in storages] == [a.data_ptr(), b.data_ptr()]
    assert state["dtypes"] == {a.data_ptr(): torch.float32, b.data_ptr(): torch.float32}
    assert state["calls"] == []
    tag = f(_typed(a))[0]
    assert tag is f(_typed(b))[0]  # one str object: the pickler memoises it as torch's


@pytest.mark.parametrize("case", ["dtype", "device", "clash", "fake", "untyped"])
def test_c_storage_ids_hand_the_rest_to_python(case: str) -> None:
    f, state, storages = _c_ids()
    t = torch.ones(4)
    if case == "dtype":  # not seen yet: Python fills the table
        obj: Any = _typed(torch.ones(4, dtype=torch.float64))
    elif case == "device":
        obj = _typed(torch.ones(4, device="meta"))
    elif case == "clash":  # one storage as two dtypes: Python raises torch's error
        state["dtypes"][t.data_ptr()] = torch.int32
        obj = _typed(t)
    elif case == "fake":
        obj = _typed(t)
        obj._fake_device = torch.device("cuda")
    else:
        obj = t.untyped_storage()
    assert f(obj) == "python"
    assert state["calls"] == [obj]
    assert storages == [] and state["keys"] == {}


def test_save_with_the_c_hooks_writes_torchs_bytes(tmp_path: Path) -> None:
    """The pickle is torch's byte for byte (the golden-bytes test covers more kinds); here
    with many tensors of every common dtype, views and ties, through the C hooks."""
    import zipfile

    sd: dict[str, Any] = {}
    for i, dtype in enumerate((torch.float32, torch.float16, torch.int64, torch.bool)):
        sd[f"t{i}"] = torch.arange(10).to(dtype)
    sd["view"] = sd["t0"][3:].view(7, 1)
    sd["tie"] = sd["t1"]
    sd["grad"] = torch.ones(2, requires_grad=True)
    sd["conj"] = torch.zeros(2, dtype=torch.complex64).conj()
    torch.save(sd, tmp_path / "t.pt")
    with ckptio.options(crc32=True):  # so that zipfile reads it
        ckptio.save(sd, tmp_path / "c.pt")
    with zipfile.ZipFile(tmp_path / "t.pt") as zt, zipfile.ZipFile(tmp_path / "c.pt") as zc:
        assert zc.read("c/data.pkl") == zt.read("t/data.pkl")


def test_python_storage_id_feeds_the_archive_writer_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save streams each storage to the archive writer from whichever persistent_id finds
    it: with the C one off, the Python storage_id adds the same records, so the file is the
    same bytes."""
    obj: dict[str, Any] = {
        "a": torch.arange(10.0),
        "view": torch.arange(10.0)[2:],
        "i": torch.ones(3, dtype=torch.int64),
        "v3": torch.arange(4).to(V3_DTYPE),
        "big": torch.randn(300_000),
        "empty": torch.empty(0),
    }
    obj["tied"] = obj["a"]
    (tmp_path / "c").mkdir()
    (tmp_path / "py").mkdir()
    ckptio.save(obj, tmp_path / "c" / "m.pt")

    def no_c_hook(*args: Any) -> Any:
        raise AssertionError("the C persistent_id was used")

    monkeypatch.setattr(_pickler, "_C_HOOKS", False)
    monkeypatch.setattr(_core.pickling, "storage_ids", no_c_hook)
    ckptio.save(obj, tmp_path / "py" / "m.pt")
    assert (tmp_path / "py" / "m.pt").read_bytes() == (tmp_path / "c" / "m.pt").read_bytes()
    loaded = torch.load(tmp_path / "py" / "m.pt")
    assert all(same_values(loaded[k], obj[k]) for k in obj)
    assert loaded["tied"].untyped_storage().data_ptr() == loaded["a"].untyped_storage().data_ptr()
