"""load_into's C hot paths (csrc/bindings/register_specs.cpp):
_core.pickling.spec_persistent_load and _core.pickling.spec_rebuild_v2, which parse data.pkl
into StorageRefs and TensorSpecs, and _core.pickling.plan_direct_reads, which matches the
target's tensors with the file's.

Each does only the common case and hands everything else to Python. The tests check that real
calls take them, that they give what the Python paths give (and, end to end, what
``load_state_dict(torch.load(...))`` gives), and that every unusual input reaches Python.
"""

from __future__ import annotations

import array
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptio
from ckptio import _core, _load_into, _unpickler
from ckptio._archive import ArchiveReader
from ckptio.errors import CheckpointError

from conftest import V3_DTYPE, trained_optimizer

StorageRef = _unpickler.StorageRef
TensorSpec = _unpickler.TensorSpec


def _python_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes load_into take the Python functions the C paths stand in for."""
    monkeypatch.setattr(_core.pickling, "spec_persistent_load", lambda fallback, *_args: fallback)
    monkeypatch.setattr(_core.pickling, "spec_rebuild_v2", lambda fallback: fallback)
    monkeypatch.setattr(
        _core.pickling, "plan_direct_reads", lambda dests, srcs, strided: (b"", list(dests))
    )


def _checkpoint() -> dict[str, Any]:
    model, opt = trained_optimizer("adamw")
    sd = model.state_dict()
    g = torch.Generator().manual_seed(5)
    extra = {
        "view": sd["tok_emb.weight"][1:, 2:],  # offset and strides
        "t": torch.randn(4, 6, generator=g).t(),  # a transposed view: not contiguous
        "col": torch.randn(5, 1, generator=g),  # a size-1 dimension
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 3),
        "half": torch.randn(7, generator=g).half(),
        "flag": torch.tensor([True, False]),
        "v3": torch.arange(4).to(V3_DTYPE),  # _rebuild_tensor_v3
    }
    return {"model": {**sd, **extra}, "optimizer": opt.state_dict(), "epoch": 3}


def _specs(path: Path) -> dict[Any, Any]:
    with _core.io.File.open(str(path), _core.io.FileMode.READ) as f:
        return _load_into._flatten(_unpickler.unpickle_specs(ArchiveReader(f)), TensorSpec)


@pytest.mark.parametrize("writer", ["ckptio", "torch"])
def test_c_parse_gives_the_python_parse(
    tmp_path: Path, writer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ckpt.pt"
    (ckptio.save if writer == "ckptio" else torch.save)(_checkpoint(), path)
    fast = _specs(path)
    with monkeypatch.context() as m:
        _python_paths(m)
        slow = _specs(path)
    assert list(fast) == list(slow)
    for key, spec in fast.items():
        assert type(spec) is TensorSpec, key
        assert spec == slow[key], key
        assert type(spec.size) is tuple and type(spec.stride) is tuple, key


def test_real_parses_take_the_c_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.pt"
    state = {f"t{i}": torch.full((3 + i,), float(i)) for i in range(40)}
    state["h"] = torch.ones(2, dtype=torch.float16)
    ckptio.save(state, path)
    loads: list[Any] = []
    rebuilds: list[Any] = []
    original_load = _unpickler.StorageLoader.persistent_load
    original_rebuilds = _unpickler._spec_rebuilds

    def counting_load(self: Any, saved_id: Any) -> Any:
        loads.append(saved_id)
        return original_load(self, saved_id)

    def counting_rebuilds(name: str) -> Any:
        with monkeypatch.context() as m:  # the Python rebuild under the C one, counted
            m.setattr(
                _core.pickling,
                "spec_rebuild_v2",
                lambda fallback: _core_spec_rebuild_v2(
                    lambda *a: rebuilds.append(a) or fallback(*a)
                ),
            )
            return original_rebuilds(name)

    _core_spec_rebuild_v2 = _core.pickling.spec_rebuild_v2
    monkeypatch.setattr(_unpickler.StorageLoader, "persistent_load", counting_load)
    monkeypatch.setattr(_unpickler, "_spec_rebuilds", counting_rebuilds)
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    assert ckptio.load_into(target, path) == ([], [])
    for k, v in state.items():
        assert torch.equal(target[k], v), k
    # The Python persistent_load runs once per storage type (it fills the type table), the
    # Python rebuild never.
    assert len(loads) == 2
    assert rebuilds == []


# -- spec_persistent_load ----------------------------------------------------------------------
class _Fallback:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        return "fallback"


_RECORDS = {"data/0": (64, 24, 0), "data/1": (128, 8, 0), "data/s": (192, 8, 8)}
_TYPES: dict[Any, tuple[torch.dtype, int]] = {torch.FloatStorage: (torch.float32, 4)}


def _spec_load() -> tuple[Any, _Fallback, dict[str, Any]]:
    fallback, loaded = _Fallback(), {}
    return (
        _core.pickling.spec_persistent_load(fallback, _RECORDS, dict(_TYPES), loaded),
        fallback,
        loaded,
    )


def test_spec_persistent_load_common_case() -> None:
    load, fallback, loaded = _spec_load()
    ref = load(("storage", torch.FloatStorage, "0", "cpu", 6))
    assert type(ref) is StorageRef
    assert ref == StorageRef((64, 24, torch.float32, 4))
    assert (ref.data_offset, ref.nbytes, ref.dtype, ref.itemsize) == (64, 24, torch.float32, 4)
    assert loaded == {"0": ref}
    assert load(("storage", torch.FloatStorage, "0", "cuda:1", 6)) is ref  # one per key
    assert fallback.calls == []


@pytest.mark.parametrize(
    "saved_id",
    [
        "0",
        ("storage", torch.FloatStorage, "0", "cpu"),  # four fields
        ["storage", torch.FloatStorage, "0", "cpu", 6],  # a list
        ("Storage", torch.FloatStorage, "0", "cpu", 6),  # another tag
        (b"storage", torch.FloatStorage, "0", "cpu", 6),  # bytes (protocol 2 files)
        ("storage", torch.FloatStorage, b"0", "cpu", 6),
        ("storage", torch.FloatStorage, "0", b"cpu", 6),
        ("storage", torch.FloatStorage, "0", "cpu", 0),  # empty: not shared
        ("storage", torch.FloatStorage, "0", "cpu", -1),
        ("storage", torch.FloatStorage, "0", "cpu", True),  # not an exact int
        ("storage", torch.FloatStorage, "0", "cpu", 2**70),
        ("storage", torch.FloatStorage, "0", "cpu", 5),  # record of another size
        ("storage", torch.HalfStorage, "0", "cpu", 6),  # a type the table does not know
        ("storage", [], "0", "cpu", 6),  # unhashable
        ("storage", torch.FloatStorage, "9", "cpu", 6),  # no such record
        ("storage", torch.FloatStorage, "s", "cpu", 2),  # compressed record
    ],
)
def test_spec_persistent_load_falls_back(saved_id: Any) -> None:
    load, fallback, loaded = _spec_load()
    assert load(saved_id) == "fallback"
    assert fallback.calls == [((saved_id,), {})]
    assert loaded == {}


def test_spec_persistent_load_odd_calls_fall_back() -> None:
    load, fallback, _ = _spec_load()
    assert load() == "fallback"
    assert load(1, 2) == "fallback"
    assert fallback.calls == [((), {}), ((1, 2), {})]


def test_spec_persistent_load_passes_fallback_errors_through() -> None:
    def fallback(saved_id: Any) -> Any:
        raise KeyboardInterrupt

    load = _core.pickling.spec_persistent_load(fallback, _RECORDS, {}, {})
    with pytest.raises(KeyboardInterrupt):
        load(("storage", torch.FloatStorage, "0", "cpu", 6))


# -- spec_rebuild_v2 ---------------------------------------------------------------------------
def _python_rebuild(monkeypatch: pytest.MonkeyPatch) -> Any:
    with monkeypatch.context() as m:
        m.setattr(_core.pickling, "spec_rebuild_v2", lambda fallback: fallback)
        return _unpickler._spec_rebuilds("f.pt")["torch._utils._rebuild_tensor_v2"]


_REF = StorageRef((4096, 96, torch.float32, 4))  # 24 elements


@pytest.mark.parametrize(
    "geometry",
    [
        (0, (24,), (1,)),
        (0, (4, 6), (6, 1)),
        (2, (2, 11), (11, 1)),  # the last element is the storage's last
        (0, (6, 4), (1, 6)),  # transposed
        (5, (), ()),  # 0-d
        (23, (1,), (7,)),
        (0, (3, 0), (2**62, 2**62)),  # no elements: any stride
        (24, (0,), (1,)),
        (0, (1, 1, 24), (0, 0, 1)),
    ],
)
def test_spec_rebuild_builds_what_python_builds(
    geometry: tuple[Any, Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = _unpickler._spec_rebuilds("f.pt")["torch._utils._rebuild_tensor_v2"]
    slow = _python_rebuild(monkeypatch)
    offset, size, stride = geometry
    for extra in ((), ({"m": 1},)):
        got = fast(_REF, offset, size, stride, False, {}, *extra)
        assert type(got) is TensorSpec
        assert got == slow(_REF, offset, size, stride, False, {}, *extra)
        assert got == TensorSpec((4096, torch.float32, offset, size, stride))


@pytest.mark.parametrize(
    "args",
    [
        (_REF, 0, (25,), (1,)),  # one element past the storage
        (_REF, 1, (24,), (1,)),
        (_REF, 0, (2, 13), (13, 1)),
        (_REF, -1, (2,), (1,)),
        (_REF, 0, (2,), (-1,)),
        (_REF, 0, (-2,), (1,)),
        (_REF, True, (2,), (1,)),
        (_REF, 0, (True,), (1,)),
        (_REF, 0, (2, 3), (1,)),  # lengths differ
        (_REF, 0, [2], [1]),  # lists: the Python check takes them
        (_REF, 2**64, (1,), (1,)),
        (_REF, 0, (2**62, 3), (3, 2**62)),  # overflows 64 bits
        (_REF, 0, (2,), (2**63,)),
        (_REF, 0, (2.0,), (1,)),
        ((4096, 96, torch.float32, 4), 0, (2,), (1,)),  # a tuple the pickle built
        (torch.UntypedStorage(16), 0, (2,), (1,)),
    ],
)
def test_spec_rebuild_leaves_the_rest_to_python(
    args: tuple[Any, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the C rebuild does not take, the Python one judges, with the same outcome."""
    fast = _unpickler._spec_rebuilds("f.pt")["torch._utils._rebuild_tensor_v2"]
    slow = _python_rebuild(monkeypatch)
    outcomes = []
    for rebuild in (fast, slow):
        try:
            outcomes.append(("ok", rebuild(*args, False, {})))
        except CheckpointError as e:
            outcomes.append(("error", str(e)))
    assert outcomes[0] == outcomes[1]
    calls: list[Any] = []
    spy = _core.pickling.spec_rebuild_v2(lambda *a: calls.append(a))
    spy(*args, False, {})
    assert len(calls) == 1  # the C path declined


def test_spec_rebuild_odd_arities_fall_back() -> None:
    calls: list[Any] = []
    rebuild = _core.pickling.spec_rebuild_v2(lambda *a: calls.append(a) or "fallback")
    assert rebuild(_REF, 0, (2,), (1,)) == "fallback"
    assert rebuild(_REF, 0, (2,), (1,), False, {}, None, "extra") == "fallback"
    assert len(calls) == 2


# -- plan_direct_reads --------------------------------------------------------------------------
def _spec(offset: int, dtype: torch.dtype, so: int, size: Any, stride: Any) -> Any:
    return TensorSpec((offset, dtype, so, size, stride))


def _triples(data: bytes) -> list[tuple[int, ...]]:
    values = array.array("Q", data)
    return [tuple(values[i : i + 3]) for i in range(0, len(values), 3)]


def test_plan_direct_reads_common_case_and_ties() -> None:
    a = torch.zeros(4, 6)
    b = torch.zeros(3, dtype=torch.float16)
    dests = {("a",): a, ("tied",): a, ("b",): b, ("gone",): torch.zeros(1)}
    srcs = {
        ("a",): _spec(4096, torch.float32, 0, (4, 6), (6, 1)),
        ("tied",): _spec(4096, torch.float32, 0, (4, 6), (6, 1)),
        ("b",): _spec(8192, torch.float16, 5, (3,), (1,)),
    }
    direct, rest = _core.pickling.plan_direct_reads(dests, srcs, torch.strided)
    assert rest == []
    assert _triples(direct) == [(4096, 96, a.data_ptr()), (8192 + 10, 6, b.data_ptr())]


def test_plan_direct_reads_leaves_the_rest_to_python() -> None:
    base = torch.zeros(6, 4)
    dests = {
        ("strided_dest",): base.t(),
        ("strided_src",): torch.zeros(4, 6),
        ("dtype",): torch.zeros(3, dtype=torch.float64),
        ("shape",): torch.zeros(3),
        ("meta",): torch.zeros(3, device="meta"),
        ("sparse",): torch.eye(3).to_sparse(),
        ("reason",): torch.zeros(3),
        ("empty",): torch.zeros(0, 3),
        ("col",): torch.zeros(5, 1),
    }
    srcs = {
        ("strided_dest",): _spec(0, torch.float32, 0, (4, 6), (6, 1)),
        ("strided_src",): _spec(0, torch.float32, 0, (4, 6), (1, 4)),
        ("dtype",): _spec(0, torch.float32, 0, (3,), (1,)),
        ("shape",): _spec(0, torch.float32, 0, (4,), (1,)),
        ("meta",): _spec(0, torch.float32, 0, (3,), (1,)),
        ("sparse",): _spec(0, torch.float32, 0, (3, 3), (3, 1)),
        ("reason",): "only dense (strided) tensors can be loaded into",
        ("empty",): _spec(0, torch.float32, 0, (0, 3), (3, 1)),
        ("col",): _spec(64, torch.float32, 0, (5, 1), (1, 99)),  # size 1: any stride
    }
    direct, rest = _core.pickling.plan_direct_reads(dests, srcs, torch.strided)
    assert rest == [
        ("strided_dest",),
        ("strided_src",),
        ("dtype",),
        ("shape",),
        ("meta",),
        ("sparse",),
        ("reason",),
    ]
    assert _triples(direct) == [(64, 20, dests[("col",)].data_ptr())]


class _Odd(torch.Tensor):
    error: type[BaseException] = ValueError

    @property
    def shape(self) -> Any:  # type: ignore[override]
        raise self.error("no shape")


def test_plan_direct_reads_errors(tmp_path: Path) -> None:
    odd = torch.zeros(3).as_subclass(_Odd)
    srcs = {("x",): _spec(0, torch.float32, 0, (3,), (1,))}
    assert _core.pickling.plan_direct_reads({("x",): odd}, srcs, torch.strided) == (b"", [("x",)])
    _Odd.error = KeyboardInterrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            _core.pickling.plan_direct_reads({("x",): odd}, srcs, torch.strided)
    finally:
        _Odd.error = ValueError
    # End to end, Python then raises what the destination raises.
    path = tmp_path / "x.pt"
    ckptio.save({"x": torch.ones(3)}, path)
    with pytest.raises(ValueError, match="no shape"):
        ckptio.load_into({"x": odd}, path)


def _random_case(
    g: torch.Generator, mismatches: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A file state and a target for it with random geometries, views, ties, dtypes, strided
    destinations and (if `mismatches`) some dtypes and shapes that differ."""
    dtypes = (torch.float32, torch.float16, torch.int64, torch.bool, torch.bfloat16)
    state: dict[str, Any] = {}
    target: dict[str, Any] = {}
    for i in range(30):
        dtype = dtypes[int(torch.randint(0, len(dtypes), (1,), generator=g))]
        ndim = int(torch.randint(0, 4, (1,), generator=g))
        size = tuple(int(x) for x in torch.randint(0, 5, (ndim,), generator=g))
        base = torch.randint(0, 100, (max(1, 2 * torch.Size(size).numel()) + 3,), generator=g)
        t = base.to(dtype)[3 : 3 + torch.Size(size).numel()].view(size)
        if ndim >= 2 and torch.rand(1, generator=g) < 0.3:
            t = t.transpose(0, 1)
        state[f"t{i}"] = t
        kind = float(torch.rand(1, generator=g)) if i else 1.0  # t0 fits: the tie's
        if kind < 0.2 and not mismatches:
            target[f"t{i}"] = torch.zeros(t.shape, dtype=t.dtype)
        elif kind < 0.1:
            target[f"t{i}"] = torch.zeros(t.shape, dtype=torch.float64)  # dtype mismatch
        elif kind < 0.2:
            target[f"t{i}"] = torch.zeros(t.numel() + 1, dtype=t.dtype)  # shape mismatch
        elif kind < 0.35 and t.dim() >= 2:
            dims = tuple(reversed(range(t.dim())))  # a strided destination
            target[f"t{i}"] = torch.zeros(t.shape[::-1], dtype=t.dtype).permute(dims)
        else:
            target[f"t{i}"] = torch.zeros(t.shape, dtype=t.dtype)
    state["tie"] = state["t0"]
    target["tie"] = target["t0"]
    return state, target


@pytest.mark.parametrize("seed", range(6))
def test_load_into_gives_what_the_python_paths_give(
    tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = torch.Generator().manual_seed(seed)
    state, target = _random_case(g, mismatches=seed % 2 == 1)
    path = tmp_path / "r.pt"
    ckptio.save(state, path)
    outcomes = []
    for python in (False, True):
        t = {k: v.clone() for k, v in target.items()}  # (clone keeps the strides)
        t["tie"] = t["t0"]
        with monkeypatch.context() as m:
            if python:
                _python_paths(m)
            try:
                ckptio.load_into(t, path)
                outcomes.append(("ok", t))
            except RuntimeError as e:
                outcomes.append(("error", str(e)))
    assert outcomes[0][0] == outcomes[1][0] == ("error" if seed % 2 else "ok")
    if outcomes[0][0] == "error":
        assert outcomes[0][1] == outcomes[1][1]
        return
    fast, slow = outcomes[0][1], outcomes[1][1]
    for k, v in state.items():
        assert torch.equal(fast[k], v) and torch.equal(slow[k], v), k


@pytest.mark.parametrize("seed", range(6))
def test_load_into_matches_torch_where_shapes_match(tmp_path: Path, seed: int) -> None:
    """The oracle: load_state_dict of torch.load, over the cases that load."""
    g = torch.Generator().manual_seed(100 + seed)
    state, target = _random_case(g)
    fits = {
        k: v for k, v in target.items() if v.shape == state[k].shape and v.dtype == state[k].dtype
    }
    path = tmp_path / "r.pt"
    torch.save({k: state[k] for k in fits}, path)
    assert ckptio.load_into(fits, path) == ([], [])
    oracle = torch.load(path)
    for k, v in fits.items():
        assert torch.equal(v, oracle[k]), k
    assert fits["tie"] is fits["t0"]
