"""A refused weights-only load names every global the file needs that the allowlist lacks,
and the line that allows them; `ckptio inspect` lists them too."""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ckptio
from hostile.child import child_env


class Custom:
    def __init__(self, v: int) -> None:
        self.v = v


@pytest.fixture
def needy(tmp_path: Path) -> Path:
    path = tmp_path / "needy.pt"
    obj = {
        "w": torch.ones(2),
        "args": argparse.Namespace(lr=0.1),
        "s": np.float64(1.5),
        "c": Custom(1),
    }
    torch.save(obj, path)
    return path


def _lacking() -> list[str]:
    scalar = f"{np.float64(0).__reduce__()[0].__module__}.scalar"  # numpy.core or numpy._core
    return ["argparse.Namespace", scalar, "numpy.dtype", f"{__name__}.Custom"]


def test_error_names_every_lacking_global(needy: Path) -> None:
    with pytest.raises(ckptio.UnsafeGlobalError) as info:
        ckptio.load(needy)
    e = info.value
    assert isinstance(e, pickle.UnpicklingError) and isinstance(e, ckptio.CheckpointError)
    assert e.globals == _lacking() and e.blocked == []
    names = ", ".join(_lacking())
    assert f"torch.serialization.add_safe_globals([{names}])" in str(e)
    assert f"with torch.serialization.safe_globals([{names}]):" in str(e)


def test_suggested_line_makes_the_load_work(needy: Path) -> None:
    with pytest.raises(ckptio.UnsafeGlobalError) as info:
        ckptio.load(needy)
    import numpy  # noqa: F401  (the suggested line names these modules)

    objs = [
        {"argparse.Namespace": argparse.Namespace, f"{__name__}.Custom": Custom}.get(g) or np.dtype
        if g == "numpy.dtype"
        else {"argparse.Namespace": argparse.Namespace, f"{__name__}.Custom": Custom}.get(g)
        or np.float64(0).__reduce__()[0]
        for g in info.value.globals
    ]
    dtype_types = [type(np.dtype("float64"))]  # numpy >= 1.25 pickles the dtype class too
    with torch.serialization.safe_globals([*objs, *dtype_types]):
        got = ckptio.load(needy)
        want = torch.load(needy)
    assert got["args"] == want["args"] and got["s"] == want["s"] and got["c"].v == 1


def test_blocked_module_listed_apart(tmp_path: Path) -> None:
    import os

    path = tmp_path / "evil.pt"
    torch.save({"f": os.getcwd, "n": argparse.Namespace()}, path)
    with pytest.raises(ckptio.UnsafeGlobalError) as info:
        ckptio.load(path)
    assert info.value.blocked == [f"{os.getcwd.__module__}.getcwd"]
    assert "argparse.Namespace" in info.value.globals and "blocked" in str(info.value)


def _inspect(*args: str) -> subprocess.CompletedProcess[str]:
    """`ckptio inspect` in a child, with the ckptio this test imports (the installed one, or
    CKPTIO_TEST_PYTHONPATH's)."""
    return subprocess.run(
        [sys.executable, "-m", "ckptio", "inspect", *args],
        capture_output=True, text=True, env=child_env(), cwd=Path(__file__).parent.parent,
    )  # fmt: skip


def test_inspect_lists_globals(needy: Path, tmp_path: Path) -> None:
    r = _inspect(str(needy))
    assert r.returncode != 0 and "Weights only load failed" in r.stderr
    assert "not allowlisted: " + ", ".join(_lacking()) in r.stdout
    assert "torch._utils._rebuild_tensor_v2" in r.stdout  # every global, allowed ones too
    found = json.loads(_inspect("--json", str(needy)).stdout)["globals"]
    assert found["lacking"] == _lacking()
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, plain)
    r = _inspect(str(plain))
    assert r.returncode == 0 and "not allowlisted: -" in r.stdout


def _legacy_needy(tmp_path: Path) -> Path:
    path = tmp_path / "legacy.pt"
    obj = {"w": torch.ones(2), "args": argparse.Namespace(lr=0.1), "c": Custom(1)}
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


def _big_endian_needy(tmp_path: Path) -> Path:
    """A zip checkpoint that says its data is big-endian: torch's own loader reads it."""
    import zipfile

    src = tmp_path / "src.pt"
    torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=0.1), "c": Custom(1)}, src)
    dst = tmp_path / "big.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item)
            zout.writestr(item, b"big" if item.filename.endswith("/byteorder") else data)
    return dst


@pytest.mark.parametrize("kind", ["legacy", "big-endian"])
def test_torch_loaded_files_name_every_lacking_global(tmp_path: Path, kind: str) -> None:
    # Legacy and byte-swapped files are unpickled by torch's weights-only loader, which names
    # the first global it refuses; ckptio's error names all of them, as for its own loads.
    path = _legacy_needy(tmp_path) if kind == "legacy" else _big_endian_needy(tmp_path)
    lacking = ["argparse.Namespace", f"{__name__}.Custom"]
    with pytest.raises(ckptio.UnsafeGlobalError) as info:
        ckptio.load(path)
    e = info.value
    assert isinstance(e, pickle.UnpicklingError) and isinstance(e, ckptio.CheckpointError)
    assert e.globals == lacking and e.blocked == []
    assert f"torch.serialization.add_safe_globals([{', '.join(lacking)}])" in str(e)
    assert isinstance(e.__cause__, pickle.UnpicklingError)  # torch's own error, kept
    with torch.serialization.safe_globals([argparse.Namespace, Custom]):
        got = ckptio.load(path)
    assert got["args"] == argparse.Namespace(lr=0.1) and got["c"].v == 1
