"""The C type dispatch behind the save pickler's hooks (_core.dispatch_by_type)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

import ckptio
from ckptio import _core


def test_dispatch_calls_the_function_of_the_exact_type_only() -> None:
    class Sub(int):
        pass

    seen: list[object] = []
    f = _core.dispatch_by_type({int: lambda x: seen.append(x) or ("int", x)}, "default")
    assert f(3) == ("int", 3)
    assert f(Sub(4)) == "default"  # subclasses are not their base
    assert f("s") == "default"
    assert f([1]) == "default"  # unhashable objects are fine: only their type is looked up
    assert seen == [3]


def test_dispatch_propagates_exceptions_and_reads_the_table_at_each_call() -> None:
    def boom(_x: object) -> None:
        raise ValueError("boom")

    table: dict[type, object] = {}
    f = _core.dispatch_by_type(table, None)
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
