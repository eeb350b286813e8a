"""torch.load parity beyond the round trips of test_roundtrip.py, with stock torch as the
oracle: the remaining map_location forms, CUDA-located files on a CPU machine, tensor kinds
(per-channel quantized, conj bit, Parameter subclasses, requires_grad), refused globals and
their messages, full loads with a custom pickle_module and pickle_load_args, legacy files
under weights-only rules, and what both loaders refuse."""

from __future__ import annotations

import io
import pickle
import types
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

import ckptio

from conftest import assert_same, assert_same_sharing, torch_archive_parts, write_plain_zip


def _obj() -> dict[str, Any]:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return {"base": base, "row": base[1], "t": base.t(), "b": torch.ones(2, dtype=torch.int64)}


def _cuda_file(path: Path) -> dict[str, Any]:
    """A file whose persistent ids say 'cuda:0' (CPU tensors' pickle, location rewritten)."""
    obj = _obj()
    pkl, payloads = torch_archive_parts(obj)
    cpu = b"X\x03\x00\x00\x00cpu"
    assert cpu in pkl
    pkl = pkl.replace(cpu, b"X\x06\x00\x00\x00cuda:0")
    records = {"data.pkl": pkl, "byteorder": b"little"}
    records.update({f"data/{i}": p for i, p in enumerate(payloads)})
    records["version"] = b"3\n"
    write_plain_zip(path, records)
    return obj


def _to_cpu(storage: Any, location: str) -> Any:
    return storage


MAP_LOCATIONS: dict[str, Any] = {
    "none": None,
    "str": "cpu",
    "device": torch.device("cpu"),
    "dict": {"cpu": "cpu"},
    "dict-other": {"cuda:1": "cpu"},
    "callable": _to_cpu,
    "callable-returns-none": lambda storage, location: None,  # torch: keep the storage
}


@pytest.mark.parametrize("mmap", [False, True], ids=["eager", "mmap"])
@pytest.mark.parametrize("map_location", list(MAP_LOCATIONS))
@pytest.mark.parametrize("writer", ["ckptio", "torch"])
def test_every_map_location_form(
    tmp_path: Path, writer: str, map_location: str, mmap: bool
) -> None:
    obj = _obj()
    path = tmp_path / "m.pt"
    (ckptio.save if writer == "ckptio" else torch.save)(obj, path)
    ml = MAP_LOCATIONS[map_location]
    ours = ckptio.load(path, map_location=ml, mmap=mmap)
    theirs = torch.load(path, map_location=ml, mmap=mmap)
    assert_same(theirs, ours)
    assert_same(obj, ours)
    assert_same_sharing(theirs, ours)


CUDA_MAPS: dict[str, Any] = {
    "str": "cpu",
    "device": torch.device("cpu"),
    "dict": {"cuda:0": "cpu"},
    "callable": _to_cpu,
    "meta": torch.device("meta"),
}


@pytest.mark.parametrize("mmap", [False, True], ids=["eager", "mmap"])
@pytest.mark.parametrize("map_location", list(CUDA_MAPS))
def test_cuda_saved_file_on_cpu(tmp_path: Path, map_location: str, mmap: bool) -> None:
    path = tmp_path / "cuda.pt"
    obj = _cuda_file(path)
    ml = CUDA_MAPS[map_location]
    ours = ckptio.load(path, map_location=ml, mmap=mmap)
    theirs = torch.load(path, map_location=ml, mmap=mmap)
    assert_same(theirs, ours, values=map_location != "meta")
    assert_same(obj, ours, values=map_location != "meta")
    assert_same_sharing(theirs, ours)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
@pytest.mark.parametrize("mmap", [False, True], ids=["eager", "mmap"])
@pytest.mark.parametrize("map_location", ["none", "dict-unrelated"])
def test_cuda_saved_file_without_a_cpu_mapping(
    tmp_path: Path, map_location: str, mmap: bool
) -> None:
    path = tmp_path / "cuda.pt"
    _cuda_file(path)
    ml = None if map_location == "none" else {"cuda:1": "cpu"}
    with pytest.raises(RuntimeError) as theirs:
        torch.load(path, map_location=ml, mmap=mmap)
    with pytest.raises(RuntimeError) as ours:
        ckptio.load(path, map_location=ml, mmap=mmap)
    # The file is valid: torch's own refusal reaches the caller as torch raises it (the same
    # class and message, naming map_location), never a CheckpointError.
    assert type(ours.value) is type(theirs.value)
    assert not isinstance(ours.value, ckptio.CheckpointError)
    assert str(ours.value) == str(theirs.value)
    assert "map_location" in str(ours.value)


def test_map_location_callable_errors_propagate(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save(_obj(), path)

    def refuse(storage: Any, location: str) -> Any:
        raise KeyError(f"no place for {location}")

    with pytest.raises(KeyError, match="no place for cpu"):
        torch.load(path, map_location=refuse)
    with pytest.raises(KeyError, match="no place for cpu"):
        ckptio.load(path, map_location=refuse)


# ------------------------------------------------------------------------------ tensor kinds
class MyParameter(nn.Parameter):
    """A Parameter subclass: torch pickles it as a Parameter."""


def _per_channel() -> torch.Tensor:
    return torch.quantize_per_channel(
        torch.tensor([[1.0, -2.0], [3.0, 4.5]]),
        torch.tensor([0.1, 0.2], dtype=torch.float64),
        torch.tensor([0, 1]),
        axis=0,
        dtype=torch.qint8,
    )


KINDS: dict[str, Callable[[], Any]] = {
    "quantized-per-channel": _per_channel,
    "conj-bit": lambda: torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj(),
    "requires-grad": lambda: torch.ones(3, requires_grad=True),
    "parameter-frozen": lambda: nn.Parameter(torch.ones(2, 2), requires_grad=False),
    "parameter-subclass": lambda: MyParameter(torch.arange(4.0)),
}


def _describe(t: Any) -> Any:
    out: dict[str, Any] = {"type": type(t), "requires_grad": t.requires_grad}
    if t.is_quantized:
        out.update(
            repr=t.int_repr(),
            scales=t.q_per_channel_scales(),
            zero_points=t.q_per_channel_zero_points(),
            axis=t.q_per_channel_axis(),
            dtype=t.dtype,
        )
    else:
        out.update(conj=t.is_conj(), values=t.detach().resolve_conj())
    return out


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning")
@pytest.mark.parametrize("mode", ["default", "mmap", "full"])
@pytest.mark.parametrize("writer", ["ckptio", "torch"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_tensor_kinds(tmp_path: Path, kind: str, writer: str, mode: str) -> None:
    obj = {"t": KINDS[kind](), "n": 1}
    path = tmp_path / "k.pt"
    (ckptio.save if writer == "ckptio" else torch.save)(obj, path)
    kw: dict[str, Any] = {"mmap": mode == "mmap", "weights_only": mode != "full"}
    ours, theirs = ckptio.load(path, **kw), torch.load(path, **kw)
    assert_same(_describe(theirs["t"]), _describe(ours["t"]))
    if kind != "parameter-subclass":  # torch itself brings a Parameter subclass back as Parameter
        assert_same(_describe(obj["t"]), _describe(ours["t"]))


# ------------------------------------------------------------------------- refused globals
class Custom:
    def __init__(self, v: int) -> None:
        self.v = v


def test_refused_global_message_matches_torch(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    torch.save({"c": Custom(1)}, path)
    # ckptio's default is weights-only on every torch; torch 2.5's is not, so ask for it.
    with pytest.raises(pickle.UnpicklingError) as theirs:
        torch.load(path, weights_only=True)
    with pytest.raises(ckptio.UnsafeGlobalError) as ours:
        ckptio.load(path)
    name = f"{Custom.__module__}.Custom"
    for message in (str(theirs.value), str(ours.value)):
        assert name in message  # both name the global...
        assert "add_safe_globals" in message and "safe_globals" in message  # ...and the cure
        assert "weights_only" in message.replace(" ", "_").lower() or "Weights only" in message
    assert isinstance(ours.value, pickle.UnpicklingError)
    with torch.serialization.safe_globals([Custom]):
        assert ckptio.load(path)["c"].v == torch.load(path, weights_only=True)["c"].v == 1


def test_protocol_4_is_refused_by_both_in_weights_only_mode(tmp_path: Path) -> None:
    path = tmp_path / "p4.pt"
    torch.save({"w": torch.ones(2)}, path, pickle_protocol=4)
    with (
        pytest.warns(UserWarning, match="protocol 4"),
        pytest.raises(pickle.UnpicklingError, match="Unsupported operand 149"),
    ):
        torch.load(path, weights_only=True)
    with pytest.raises(ckptio.CheckpointError, match="FRAME at offset 2"):
        ckptio.load(path)


# ------------------------------------------------------------- full loads: pickle_module
def _recording_module(calls: list[str]) -> types.ModuleType:
    """A pickle_module whose Unpickler records that it ran and what it was given."""
    module = types.ModuleType("recording_pickle")

    class Unpickler(pickle.Unpickler):
        def __init__(self, file: Any, **kwargs: Any) -> None:
            calls.append(f"Unpickler({sorted(kwargs.items())})")
            super().__init__(file, **kwargs)

        def find_class(self, mod: str, name: str) -> Any:
            calls.append(f"find_class({mod}.{name})")
            return super().find_class(mod, name)

    module.Unpickler = Unpickler  # type: ignore[attr-defined]
    module.load = pickle.load  # type: ignore[attr-defined]
    module.__name__ = "recording_pickle"
    return module


@pytest.mark.parametrize("writer", ["ckptio", "torch"])
def test_custom_pickle_module_and_load_args(tmp_path: Path, writer: str) -> None:
    obj = {"w": torch.arange(3.0), "s": "text", "c": Custom(5)}
    path = tmp_path / "pm.pt"
    (ckptio.save if writer == "ckptio" else torch.save)(obj, path)
    ours_calls: list[str] = []
    theirs_calls: list[str] = []
    ours = ckptio.load(path, pickle_module=_recording_module(ours_calls), encoding="latin1")
    theirs = torch.load(path, pickle_module=_recording_module(theirs_calls), encoding="latin1")
    assert ours["c"].v == theirs["c"].v == 5
    assert torch.equal(ours["w"], theirs["w"])
    # Both ran the given module's Unpickler with the given arguments and resolved the user
    # class through it (torch resolves a few of its own globals itself).
    assert ours_calls[0] == theirs_calls[0] == "Unpickler([('encoding', 'latin1')])"
    custom = f"find_class({Custom.__module__}.Custom)"
    assert custom in ours_calls and custom in theirs_calls


def test_full_load_with_weights_only_false_and_encoding(tmp_path: Path) -> None:
    path = tmp_path / "e.pt"
    torch.save({"s": "é", "w": torch.ones(1)}, path)
    for kw in ({"encoding": "utf-8"}, {"encoding": "latin1", "errors": "strict"}):
        ours = ckptio.load(path, weights_only=False, **kw)
        theirs = torch.load(path, weights_only=False, **kw)
        assert ours["s"] == theirs["s"] == "é"


# ------------------------------------------------------------------------- legacy files
@pytest.mark.parametrize("mode", ["path", "buffer"])
def test_legacy_file_follows_weights_only_rules(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "legacy.pt"
    torch.save({"c": Custom(2), "w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)

    def load(fn: Callable[..., Any], **kw: Any) -> Any:
        return fn(io.BytesIO(path.read_bytes()) if mode == "buffer" else path, **kw)

    with pytest.raises(pickle.UnpicklingError) as ours:
        load(ckptio.load)
    with pytest.raises(pickle.UnpicklingError) as theirs:
        load(torch.load, weights_only=True)  # ckptio's default; torch 2.5's default is False
    assert "Custom" in str(ours.value) and "Custom" in str(theirs.value)
    with torch.serialization.safe_globals([Custom]):
        assert load(ckptio.load)["c"].v == 2
    assert load(ckptio.load, weights_only=False)["c"].v == 2


def test_mmap_on_a_file_object_raises_like_torch(tmp_path: Path) -> None:
    path = tmp_path / "f.pt"
    torch.save({"w": torch.ones(2)}, path)
    with open(path, "rb") as f, pytest.raises(ValueError) as theirs:
        torch.load(f, mmap=True)
    with open(path, "rb") as f, pytest.raises(ValueError) as ours:
        ckptio.load(f, mmap=True)
    assert str(ours.value) == str(theirs.value)


def test_no_warnings_on_plain_loads(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(_obj(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kw in ({}, {"mmap": True}, {"map_location": "cpu"}):
            ckptio.load(path, **kw)


@pytest.mark.parametrize("location", [b"row", b"ipu"])
def test_location_naming_no_device_is_a_file_error(tmp_path: Path, location: bytes) -> None:
    """Found by the mutation tests: a bit flip made a storage's location 'row' (make fuzz-py
    found 'ipu', a device without a deserializer). torch raises RuntimeError; ckptio a
    CheckpointError (a RuntimeError) with torch's message."""
    obj = _obj()
    pkl, payloads = torch_archive_parts(obj)
    pkl = pkl.replace(b"X\x03\x00\x00\x00cpu", b"X\x03\x00\x00\x00" + location)
    records = {"data.pkl": pkl, "version": b"3\n"}
    records.update({f"data/{i}": p for i, p in enumerate(payloads)})
    path = tmp_path / "row.pt"
    write_plain_zip(path, records)
    with pytest.raises(RuntimeError, match="restore data location"):
        torch.load(path)
    for kw in ({}, {"mmap": True}):
        with pytest.raises(ckptio.CheckpointError, match="restore data location"):
            ckptio.load(path, **kw)
