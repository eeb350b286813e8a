"""CheckpointError means one thing: the file is at fault.

An error of the machine (a CUDA out-of-memory error, torch's CPU allocator failing) or of
ckptio's own allocation, reads and placement of storages reaches the caller as itself, so
``except torch.cuda.OutOfMemoryError:`` fallbacks keep working, on every load path: eager,
mmap, staged to a device, load_into, open, and the files handed to torch's own loader.
Malformed files keep raising CheckpointError (test_hostile, test_mutation, test_errors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import ckptio
from ckptio import _reads, _staging, _unpickler
from ckptio.settings import options

ERRORS: dict[str, Callable[[], BaseException]] = {
    "cuda-oom": lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
    "runtime": lambda: RuntimeError("the allocator failed"),
}


def _raiser(make: Callable[[], BaseException]) -> Callable[..., Any]:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise make()

    return boom


def _assert_itself(info: pytest.ExceptionInfo[BaseException], make: Callable[[], Any]) -> None:
    assert type(info.value) is type(make())
    assert not isinstance(info.value, ckptio.CheckpointError)
    assert str(info.value) == str(make())


def _obj() -> dict[str, Any]:
    return {
        "small": torch.arange(10.0),
        "large": torch.ones(300_000),  # past the small-storage block: its own allocation
        "step": 3,
    }


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "model.pt"
    torch.save(_obj(), p)
    return p


@pytest.fixture
def sparse_path(tmp_path: Path) -> Path:
    """A file load_into and open parse over placeholder storages (a sparse tensor needs
    tensor objects)."""
    p = tmp_path / "sparse.pt"
    torch.save({"dense": torch.ones(4), "sparse": torch.eye(3).to_sparse()}, p)
    return p


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
@pytest.mark.parametrize("error", list(ERRORS))
def test_eager_allocation_errors_propagate(
    path: Path, monkeypatch: pytest.MonkeyPatch, error: str, overlap: bool
) -> None:
    monkeypatch.setattr(_unpickler, "host_memory", _raiser(ERRORS[error]))
    with options(overlap_reads=overlap):
        for kw in ({}, {"map_location": "cpu"}, {"weights_only": False}):
            with pytest.raises(Exception) as info:
                ckptio.load(path, **kw)
            _assert_itself(info, ERRORS[error])


@pytest.mark.parametrize("error", list(ERRORS))
def test_mmap_placement_errors_propagate(
    path: Path, monkeypatch: pytest.MonkeyPatch, error: str
) -> None:
    monkeypatch.setattr(_unpickler.StorageLoader, "_mapped", _raiser(ERRORS[error]))
    with pytest.raises(Exception) as info:
        ckptio.load(path, mmap=True)
    _assert_itself(info, ERRORS[error])


@pytest.mark.parametrize("error", list(ERRORS))
def test_read_errors_propagate(path: Path, monkeypatch: pytest.MonkeyPatch, error: str) -> None:
    monkeypatch.setattr(_reads, "read_into", _raiser(ERRORS[error]))
    with options(overlap_reads=False), pytest.raises(Exception) as info:
        ckptio.load(path)
    _assert_itself(info, ERRORS[error])


class _FailingTarget:
    """A staged device whose allocation fails, as a full GPU's does."""

    def __init__(self, make: Callable[[], BaseException]) -> None:
        self.device = torch.device("cpu")
        self._make = make

    def allocate(self, nbytes: int) -> Any:
        raise self._make()

    def make_copier(self) -> Any:  # pragma: no cover - never reached
        raise AssertionError


@pytest.mark.parametrize("mmap", [False, True], ids=["eager", "mmap"])
@pytest.mark.parametrize("error", list(ERRORS))
def test_device_allocation_errors_propagate(
    path: Path, monkeypatch: pytest.MonkeyPatch, error: str, mmap: bool
) -> None:
    """map_location onto a GPU whose memory is full: torch.cuda.OutOfMemoryError, as
    torch.load raises it, never a CheckpointError."""
    target = _FailingTarget(ERRORS[error])
    monkeypatch.setattr(_staging, "staging_target", lambda location: target)
    for ml in ("cuda:0", torch.device("cuda", 0), {"cpu": "cuda:0"}):
        with pytest.raises(Exception) as info:
            ckptio.load(path, map_location=ml, mmap=mmap)
        _assert_itself(info, ERRORS[error])


@pytest.mark.parametrize("mmap", [False, True], ids=["eager", "mmap"])
def test_map_location_callable_errors_propagate(path: Path, mmap: bool) -> None:
    make = ERRORS["cuda-oom"]
    with pytest.raises(torch.cuda.OutOfMemoryError) as theirs:
        torch.load(path, map_location=_raiser(make), mmap=mmap)
    with pytest.raises(Exception) as ours:
        ckptio.load(path, map_location=_raiser(make), mmap=mmap)
    _assert_itself(ours, make)
    assert type(ours.value) is type(theirs.value)


@pytest.mark.parametrize("error", list(ERRORS))
def test_load_into_parse_errors_propagate(
    sparse_path: Path, monkeypatch: pytest.MonkeyPatch, error: str
) -> None:
    monkeypatch.setattr(_unpickler.PlaceholderLoader, "_storage", _raiser(ERRORS[error]))
    with pytest.raises(Exception) as info:
        ckptio.load_into({"dense": torch.zeros(4)}, sparse_path, strict=False)
    _assert_itself(info, ERRORS[error])


@pytest.mark.parametrize("error", list(ERRORS))
def test_open_errors_propagate(
    path: Path, sparse_path: Path, monkeypatch: pytest.MonkeyPatch, error: str
) -> None:
    with monkeypatch.context() as m:
        m.setattr(_unpickler.PlaceholderLoader, "_storage", _raiser(ERRORS[error]))
        for p in (path, sparse_path):
            with pytest.raises(Exception) as info:
                ckptio.open(p)
            _assert_itself(info, ERRORS[error])
    with ckptio.open(path) as ck, monkeypatch.context() as m:
        m.setattr(torch, "empty", _raiser(ERRORS[error]))
        with pytest.raises(Exception) as info:
            ck["large"]
        _assert_itself(info, ERRORS[error])


@pytest.mark.parametrize(
    "make",
    [
        ERRORS["cuda-oom"],
        lambda: RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1"),
        lambda: MemoryError(),
    ],
    ids=["cuda-oom", "cpu-allocator", "memory-error"],
)
def test_torch_delegated_allocation_errors_propagate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: Callable[[], BaseException]
) -> None:
    """Legacy files are read by torch's own loader: its allocation failing is the machine's
    fault, as torch.load raises it."""
    legacy = tmp_path / "legacy.pt"
    torch.save(_obj(), legacy, _use_new_zipfile_serialization=False)
    monkeypatch.setattr(torch.serialization, "default_restore_location", _raiser(make))
    with pytest.raises(Exception) as theirs:
        torch.load(legacy)
    with pytest.raises(Exception) as ours:
        ckptio.load(legacy)
    assert type(ours.value) is type(theirs.value) is type(make())
    assert not isinstance(ours.value, ckptio.CheckpointError)


def test_torch_delegated_map_location_errors_propagate(tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.pt"
    torch.save(_obj(), legacy, _use_new_zipfile_serialization=False)
    for make in (ERRORS["cuda-oom"], lambda: KeyError("no place")):
        with pytest.raises(Exception) as theirs:
            torch.load(legacy, map_location=_raiser(make))
        with pytest.raises(Exception) as ours:
            ckptio.load(legacy, map_location=_raiser(make))
        assert type(ours.value) is type(theirs.value) is type(make())


def test_environment_errors_are_recognised() -> None:
    from ckptio._util import is_environment_error

    assert is_environment_error(torch.cuda.OutOfMemoryError("x"))
    assert is_environment_error(torch.OutOfMemoryError("x"))
    assert is_environment_error(MemoryError())
    assert is_environment_error(OSError(5, "EIO"))
    assert is_environment_error(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    if hasattr(torch, "AcceleratorError"):
        assert is_environment_error(torch.AcceleratorError("CUDA error: illegal address"))
    assert not is_environment_error(RuntimeError("size mismatch"))
    assert not is_environment_error(ckptio.CheckpointError("can't allocate memory"))
    assert not is_environment_error(ValueError("x"))


def test_malformed_files_still_blame_the_file(tmp_path: Path) -> None:
    """The other side of the line: a storage whose location names no device, or a tensor
    reaching past its storage, is the file's fault."""
    p = tmp_path / "bad.pt"
    torch.save({"t": torch.ones(4)}, p)
    raw = bytearray(p.read_bytes())
    i = raw.index(b"X\x03\x00\x00\x00cpu")
    raw[i + 5 : i + 8] = b"row"
    p.write_bytes(bytes(raw))
    with pytest.raises(RuntimeError):
        torch.load(p)
    for kw in ({}, {"mmap": True}):
        with pytest.raises(ckptio.CheckpointError, match="restore"):
            ckptio.load(p, **kw)
