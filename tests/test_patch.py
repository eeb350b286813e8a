"""patch_torch / unpatch_torch / patched_torch: torch.save and torch.load run ckptio with
torch's results, fall through to torch for what ckptio does not take, never recurse, and
unpatching restores the original functions exactly."""

from __future__ import annotations

import fractions
import io
import pickle
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
import torch.distributed.checkpoint as dcp

import ckptio
from ckptio import patch as patch_module

from conftest import assert_same, make_model, train, zip_records

ORIGINAL_SAVE = torch.save
ORIGINAL_LOAD = torch.load


@pytest.fixture(autouse=True)
def always_unpatched() -> Iterator[None]:
    yield
    while ckptio.is_torch_patched():
        ckptio.unpatch_torch()
    assert torch.save is ORIGINAL_SAVE and torch.load is ORIGINAL_LOAD


def _obj() -> dict[str, Any]:
    base = torch.arange(24.0).reshape(4, 6)
    return {"w": base, "view": base[1:, 2:], "h": torch.linspace(-1, 1, 5).half(), "n": 3, "s": "x"}


def test_unpatch_restores_the_original_functions_exactly() -> None:
    originals = (
        torch.save,
        torch.load,
        torch.serialization.save,
        torch.serialization.load,
    )
    ckptio.patch_torch()
    assert torch.save is not originals[0] and torch.serialization.load is not originals[3]
    assert torch.save.__name__ == "save" and torch.load.__doc__ == originals[1].__doc__
    ckptio.patch_torch()  # nested: one unpatch per patch
    ckptio.unpatch_torch()
    assert ckptio.is_torch_patched()
    ckptio.unpatch_torch()
    assert (torch.save, torch.load, torch.serialization.save, torch.serialization.load) == originals
    assert not ckptio.is_torch_patched()
    with ckptio.patched_torch():
        assert ckptio.is_torch_patched()
    assert torch.save is originals[0] and torch.load is originals[1]


def test_patched_save_is_ckptio(tmp_path: Path) -> None:
    with ckptio.patched_torch():
        torch.save(_obj(), tmp_path / "ckpt.pt")
        torch.serialization.save(_obj(), tmp_path / "other.pt")
    for name in ("ckpt.pt", "other.pt"):
        data = [r for r in zip_records(tmp_path / name) if "/data/" in r.name]
        assert data and all(r.data_offset % 4096 == 0 for r in data)  # ckptio's alignment
        assert_same(_obj(), ORIGINAL_LOAD(tmp_path / name))


SAVE_KWARGS: list[dict[str, Any]] = [
    {},
    {"pickle_protocol": 4},
    {"pickle_module": pickle},
    {"_use_new_zipfile_serialization": False},
    {"_disable_byteorder_record": True},
]


@pytest.mark.parametrize("kwargs", SAVE_KWARGS, ids=lambda k: ",".join(k) or "defaults")
@pytest.mark.parametrize("target", ["path", "buffer"])
def test_save_arguments_give_torch_results(
    tmp_path: Path, kwargs: dict[str, Any], target: str
) -> None:
    def roundtrip(save: Callable[..., Any]) -> Any:
        if target == "path":
            path = tmp_path / "ckpt.pt"
            save(_obj(), path, **kwargs)
            return ORIGINAL_LOAD(path, weights_only=False)  # protocol 4 is not weights-only
        buf = io.BytesIO()
        save(_obj(), buf, **kwargs)
        buf.seek(0)
        return ORIGINAL_LOAD(buf, weights_only=False)

    expected = roundtrip(ORIGINAL_SAVE)
    with ckptio.patched_torch():
        got = roundtrip(torch.save)
    assert_same(expected, got)


LOAD_KWARGS: list[dict[str, Any]] = [
    {},
    {"map_location": "cpu"},
    {"map_location": torch.device("cpu")},
    {"map_location": {"cpu": "cpu"}},
    {"map_location": lambda storage, loc: storage},
    {"weights_only": True},
    {"weights_only": False},
    {"weights_only": False, "pickle_module": pickle},
    {"weights_only": False, "encoding": "latin1"},
    {"mmap": True},
    {"mmap": True, "weights_only": True, "map_location": "cpu"},
]


@pytest.mark.parametrize("kwargs", LOAD_KWARGS, ids=lambda k: ",".join(k) or "defaults")
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_load_arguments_give_torch_results(
    tmp_path: Path, kwargs: dict[str, Any], legacy: bool
) -> None:
    path = tmp_path / "ckpt.pt"
    ORIGINAL_SAVE(_obj(), path, _use_new_zipfile_serialization=not legacy)

    def attempt(load: Callable[..., Any]) -> tuple[type[BaseException] | None, Any]:
        try:
            return None, load(path, **kwargs)
        except Exception as e:  # torch refuses some combinations: so must the patch
            return type(e), None

    expected = attempt(ORIGINAL_LOAD)
    with ckptio.patched_torch():
        got = attempt(torch.load)
    if expected[0] is None:
        assert got[0] is None
        assert_same(expected[1], got[1])
    else:  # the same exception, or ckptio's subclass of it (CheckpointError: RuntimeError)
        assert got[0] is not None and issubclass(got[0], expected[0]), (got[0], expected[0])


def test_patched_load_is_weights_only_by_default_on_every_torch(tmp_path: Path) -> None:
    """torch 2.5's torch.load unpickles anything by default; patched, it loads weights-only,
    as torch.load does from torch 2.6 on and as ckptio.load does everywhere."""
    path = tmp_path / "fraction.pt"
    ORIGINAL_SAVE({"f": fractions.Fraction(1, 3), "w": torch.ones(2)}, path)
    with ckptio.patched_torch(), pytest.raises(ckptio.UnsafeGlobalError, match="Fraction"):
        torch.load(path)
    with ckptio.patched_torch():
        assert torch.load(path, weights_only=False)["f"] == fractions.Fraction(1, 3)
    with pytest.raises(ckptio.UnsafeGlobalError, match="Fraction"):
        ckptio.load(path)


def test_unknown_arguments_fall_through_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Arguments ckptio's signatures do not take go to torch's function as they are (load's
    extra keywords are pickle_load_args for both, as in torch)."""
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def fake_original(*args: Any, **kwargs: Any) -> str:
        seen.append((args[2:], kwargs))
        return "torch's"

    with ckptio.patched_torch(), monkeypatch.context() as m:
        m.setattr(patch_module, "_ORIGINAL_SAVE", fake_original)
        m.setattr(patch_module, "_ORIGINAL_LOAD", fake_original)
        assert torch.save({}, io.BytesIO(), a_future_option=1) == "torch's"
        assert torch.load(io.BytesIO(), None, None, "fourth") == "torch's"
    assert seen == [((), {"a_future_option": 1}), ((None, "fourth"), {})]
    with ckptio.patched_torch(), pytest.raises(TypeError, match="a_future_option"):
        torch.save({}, io.BytesIO(), a_future_option=1)  # the real torch.save refuses it


def test_delegated_cases_call_the_original_functions_without_recursion(tmp_path: Path) -> None:
    """Legacy files and TorchScript archives go to torch's own functions: through the
    originals ckptio captured, not the patched names."""
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    torch.jit.save(scripted, str(tmp_path / "script.pt"))
    with ckptio.patched_torch():
        torch.save({"w": torch.ones(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
        assert torch.equal(torch.load(tmp_path / "old.pt")["w"], torch.ones(2))
        with pytest.raises(Exception) as patched_error:
            torch.load(tmp_path / "script.pt")
    with pytest.raises(Exception) as original_error:
        ORIGINAL_LOAD(tmp_path / "script.pt")
    assert type(patched_error.value) is type(original_error.value)
    assert not isinstance(patched_error.value, RecursionError)


# torch 2.5 to 2.9: the stock FileSystemWriter calls tensor.storage() (warned once a process;
# pytest.warns re-emits it from this file, so the filter cannot name torch's module)
@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning")
def test_stock_dcp_filesystem_under_the_patch(tmp_path: Path) -> None:
    """FileSystemWriter/Reader call torch.save / torch.load on streams: the patch serves them."""
    state = {"w": torch.randn(4, 4), "step": 3}
    single = "torch.distributed is (disabled, )?unavailable"  # torch 2.5 has no "disabled, "
    with pytest.warns(UserWarning, match=single), ckptio.patched_torch():
        dcp.save(state, checkpoint_id=tmp_path)
    target = {"w": torch.zeros(4, 4), "step": 0}
    with pytest.warns(UserWarning, match=single), ckptio.patched_torch():
        dcp.load(target, checkpoint_id=tmp_path)
    assert_same(state, target)


def _train_save_resume(directory: Path, optimizer_kind: str) -> dict[str, torch.Tensor]:
    """3 steps, torch.save, a fresh model and optimizer restored with torch.load, 3 more."""
    model = make_model(seed=3)
    opt = _optimizer(model, optimizer_kind)
    train(model, opt, steps=3, seed=10)
    torch.save(
        {"model": model.state_dict(), "optim": opt.state_dict(), "step": 3},
        directory / "ckpt.pt",
    )
    del model, opt
    resumed = make_model(seed=99)  # different init: everything must come from the file
    opt = _optimizer(resumed, optimizer_kind)
    ckpt = torch.load(directory / "ckpt.pt")
    resumed.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optim"])
    assert ckpt["step"] == 3
    train(resumed, opt, steps=3, seed=13)
    return {k: v.detach().clone() for k, v in resumed.state_dict().items()}


def _optimizer(model: torch.nn.Module, kind: str) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_training_loop_resumes_identically_through_the_patch(tmp_path: Path, kind: str) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "patched").mkdir()
    expected = _train_save_resume(tmp_path / "plain", kind)
    with ckptio.patched_torch():
        got = _train_save_resume(tmp_path / "patched", kind)
    assert_same(expected, got)
    offsets = [r.data_offset for r in zip_records(tmp_path / "patched" / "ckpt.pt")]
    assert any(o % 4096 == 0 for o in offsets)  # written by ckptio
    assert not all(
        r.data_offset % 4096 == 0
        for r in zip_records(tmp_path / "plain" / "ckpt.pt")
        if "/data/" in r.name
    )
