"""Saving to a path is atomic: a failed save leaves the previous file untouched and nothing
new in the directory; a successful one replaces the file as open(path, "wb") would (mode,
symlinks) and reports OS failures as the matching OSError subclass."""

from __future__ import annotations

import errno
import io
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptio
from ckptio import _core, _files, serialization

from conftest import assert_same


class ExplodingReduce:
    def __reduce__(self) -> Any:
        raise ValueError("boom from __reduce__")


def _listing(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


@pytest.fixture
def previous(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt.pt"
    ckptio.save({"generation": 1, "w": torch.arange(1000.0)}, path)
    return path


@pytest.mark.parametrize(
    "payload",
    [{"w": torch.ones(3), "fn": lambda x: x}, {"w": torch.ones(3), "bad": ExplodingReduce()}],
    ids=["lambda", "reduce-raises"],
)
def test_pickling_error_keeps_previous_file(previous: Path, payload: Any) -> None:
    with pytest.raises(Exception) as expected:  # the oracle: what torch.save raises
        torch.save(payload, io.BytesIO())
    before = _listing(previous.parent)
    with pytest.raises(type(expected.value)):
        ckptio.save(payload, previous)
    assert _listing(previous.parent) == before
    assert torch.load(previous)["generation"] == 1


def test_pickling_error_after_many_storages_were_written(previous: Path) -> None:
    """Storages go to the file while the pickler runs: a failure after many of them stops the
    writes in flight, removes the temporary file and raises the pickler's error."""
    payload: dict[str, Any] = {f"w{i}": torch.full((300_000,), float(i)) for i in range(40)}
    payload["last"] = ExplodingReduce()
    before = _listing(previous.parent)
    with (
        ckptio.options(threads=3, write_chunk_bytes=1 << 20),
        pytest.raises(ValueError, match="boom"),
    ):
        ckptio.save(payload, previous)
    assert _listing(previous.parent) == before
    assert torch.load(previous)["generation"] == 1


_FILE_SIZE_LIMIT_SAVE = """
import errno, resource, signal, sys, torch, ckptio
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))
obj = {f"w{i}": torch.full((100_000,), float(i)) for i in range(50)}  # 20 MB
try:
    with ckptio.options(preallocate=sys.argv[2] == "1", write_chunk_bytes=1 << 20, threads=2):
        ckptio.save(obj, sys.argv[1])
except OSError as e:
    print(errno.errorcode[e.errno], e.filename == sys.argv[1] or e.filename)
"""


@pytest.mark.parametrize("preallocate", [True, False], ids=["preallocate", "no-preallocate"])
def test_write_failure_mid_save_raises_oserror(tmp_path: Path, preallocate: bool) -> None:
    """A write that fails while the pickler runs (a file-size limit: EFBIG from fallocate, or
    from a worker's pwrite without preallocation) surfaces as the OSError, with no temporary
    file left behind."""
    target = tmp_path / "big.pt"
    proc = subprocess.run(
        [sys.executable, "-c", _FILE_SIZE_LIMIT_SAVE, str(target), "1" if preallocate else "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    code, _ = proc.stdout.split()
    assert code == "EFBIG", proc.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "exc",
    [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
    ids=["ENOSPC", "KeyboardInterrupt"],
)
def test_error_while_writing_removes_temp_file(
    previous: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    """An error after the temporary file is written (or half written) removes it and leaves
    the previous file as it was."""
    real = serialization.save_object
    temp_files: list[str] = []

    def write_then_fail(target: Any, *args: Any, **kwargs: Any) -> None:
        real(target, *args, **kwargs)
        temp_files.extend(p.name for p in previous.parent.iterdir() if p != previous)
        raise exc

    monkeypatch.setattr(serialization, "save_object", write_then_fail)
    before = _listing(previous.parent)
    with pytest.raises(type(exc)):
        ckptio.save({"generation": 2, "w": torch.zeros(5000)}, previous)
    assert temp_files, "the save did not go through a temporary file next to the target"
    assert _listing(previous.parent) == before
    assert torch.load(previous)["generation"] == 1


def test_same_storage_as_two_dtypes_is_refused(previous: Path) -> None:
    x = torch.zeros(4)
    obj = {"a": x, "b": x.view(torch.int32)}
    before = _listing(previous.parent)
    with pytest.raises(RuntimeError, match="different types"):
        torch.save(obj, io.BytesIO())
    with pytest.raises(RuntimeError, match="different types"):
        ckptio.save(obj, previous)
    assert _listing(previous.parent) == before


def test_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ckptio.save({"x": torch.ones(2)}, "relative.pt")
    ckptio.save({"x": torch.zeros(2)}, "relative.pt")  # and over itself
    assert [p.name for p in tmp_path.iterdir()] == ["relative.pt"]
    assert torch.equal(torch.load("relative.pt")["x"], torch.zeros(2))


def test_failed_first_save_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ckptio.save({"bad": ExplodingReduce()}, tmp_path / "new.pt")
    assert list(tmp_path.iterdir()) == []


def test_successful_save_leaves_only_the_file(previous: Path) -> None:
    ckptio.save({"generation": 2}, previous)
    assert [p.name for p in previous.parent.iterdir()] == ["ckpt.pt"]
    assert ckptio.load(previous) == {"generation": 2}


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o755], ids=oct)
def test_overwrite_keeps_permission_bits(previous: Path, mode: int) -> None:
    os.chmod(previous, mode)
    ckptio.save({"generation": 2}, previous)
    assert stat.S_IMODE(os.stat(previous).st_mode) == mode
    assert ckptio.load(previous)["generation"] == 2


def test_new_file_mode_follows_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        ckptio.save({"x": 1}, tmp_path / "ours.pt")
        torch.save({"x": 1}, tmp_path / "theirs.pt")
    finally:
        os.umask(old)
    ours = stat.S_IMODE(os.stat(tmp_path / "ours.pt").st_mode)
    assert ours == stat.S_IMODE(os.stat(tmp_path / "theirs.pt").st_mode) == 0o640


def test_missing_directory(tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "dir" / "ckpt.pt"
    with pytest.raises(FileNotFoundError) as info:
        ckptio.save({"x": 1}, target)
    assert info.value.errno == errno.ENOENT
    assert info.value.filename is not None and "ckpt.pt" in str(info.value.filename)
    assert not (tmp_path / "no").exists()


def test_path_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError) as info:
        ckptio.save({"x": 1}, tmp_path / "d")
    assert info.value.errno == errno.EISDIR
    assert list((tmp_path / "d").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_parent_is_a_file(tmp_path: Path) -> None:
    """A path under a regular file fails as open(path, "wb") fails there (ENOTDIR)."""
    (tmp_path / "file").write_bytes(b"x")
    target = tmp_path / "file" / "ckpt.pt"
    with pytest.raises(OSError) as expected:
        open(target, "wb")  # noqa: SIM115 - the oracle; it never opens
    with pytest.raises(OSError) as info:
        ckptio.save({"x": 1}, target)
    assert type(info.value) is type(expected.value)
    assert info.value.errno == expected.value.errno == errno.ENOTDIR
    assert (tmp_path / "file").read_bytes() == b"x"


@pytest.mark.parametrize("relative", [True, False], ids=["relative-link", "absolute-link"])
def test_save_through_symlink(tmp_path: Path, relative: bool) -> None:
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    target = real_dir / "weights.pt"
    ckptio.save({"generation": 1}, target)
    link = tmp_path / "latest.pt"
    link.symlink_to(os.path.relpath(target, tmp_path) if relative else target)

    obj = {"generation": 2, "w": torch.arange(10)}
    ckptio.save(obj, link)
    assert link.is_symlink()
    assert os.readlink(link) == (os.path.relpath(target, tmp_path) if relative else str(target))
    assert_same(obj, torch.load(target))
    assert_same(obj, ckptio.load(link))
    assert sorted(p.name for p in real_dir.iterdir()) == ["weights.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt", "real"]


def test_save_through_dangling_symlink(tmp_path: Path) -> None:
    """open(link, "wb") creates the missing target; so does ckptio.save."""
    link = tmp_path / "latest.pt"
    link.symlink_to("created.pt")
    ckptio.save({"x": 1}, link)
    assert link.is_symlink()
    assert ckptio.load(tmp_path / "created.pt") == {"x": 1}


def test_read_only_target_is_not_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rename could replace a file the caller may not write; ckptio refuses as open() does.
    (CI runs as root, whom the OS lets write anything, so the OS's answer is simulated.)"""
    target = tmp_path / "frozen.pt"
    torch.save({"old": torch.ones(2)}, target)
    before = target.read_bytes()
    target.chmod(0o444)
    monkeypatch.setattr(serialization.os, "access", lambda path, how: False)
    with pytest.raises(PermissionError) as info:
        ckptio.save({"new": torch.zeros(2)}, target)
    assert info.value.errno == errno.EACCES and info.value.filename == str(target)
    assert target.read_bytes() == before


def test_save_into_a_fifo_writes_through_it(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    obj = {"w": torch.arange(10.0)}
    ckptio.save(obj, fifo)
    reader.join(timeout=30)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode), "the FIFO must not be replaced by a file"
    loaded = torch.load(io.BytesIO(received[0]))
    assert torch.equal(loaded["w"], obj["w"])


def _release_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ckptio-release"]


def _open_descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_replaced_file_is_released_in_the_background(previous: Path) -> None:
    """The file a save replaces is held open across the rename and closed on a background
    thread (freeing its blocks and page cache off the save); the descriptor never leaks, and
    a reader that had the old file open keeps reading it whole."""
    with open(previous, "rb") as reader:
        for t in _release_threads():
            t.join()
        before = _open_descriptors()
        old_inode = os.stat(previous).st_ino
        ckptio.save({"generation": 2, "w": torch.zeros(1000)}, previous)
        for t in _release_threads():
            t.join()
        assert _open_descriptors() == before
        assert os.stat(previous).st_ino != old_inode
        assert os.fstat(reader.fileno()).st_ino == old_inode
        assert torch.load(io.BytesIO(reader.read()))["generation"] == 1
    assert ckptio.load(previous)["generation"] == 2


def test_unreadable_target_is_replaced_without_holding_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A target that cannot be opened for reading (mode 0o200 for a non-root user) is
    replaced all the same; the rename then frees it."""
    path = tmp_path / "w.pt"
    ckptio.save({"generation": 1}, path)
    real_open = os.open
    refused: list[str] = []

    def no_reading(name: Any, flags: int, *args: Any) -> int:
        if os.fspath(name) == str(path) and flags & (os.O_WRONLY | os.O_RDWR) == 0:
            refused.append(str(name))
            raise PermissionError(errno.EACCES, "Permission denied", str(name))
        return real_open(name, flags, *args)

    monkeypatch.setattr(serialization.os, "open", no_reading)
    ckptio.save({"generation": 2}, path)
    monkeypatch.undo()
    assert refused == [str(path)]
    assert ckptio.load(path)["generation"] == 2


# ------------------------------------------------------------ the mechanism: _files.atomic_file
def _record_directory_syncs(monkeypatch: pytest.MonkeyPatch, target: Path) -> list[str]:
    """Replaces _core.io.sync_directory with a recorder noting, per call, the directory and
    whether `target` already held its new contents (b"new") then."""
    calls: list[str] = []
    real = _core.io.sync_directory

    def sync_directory(path: str) -> None:
        renamed = target.exists() and target.read_bytes() == b"new"
        calls.append(f"{os.path.realpath(path)}:{'renamed' if renamed else 'not renamed'}")
        real(path)

    monkeypatch.setattr(_core.io, "sync_directory", sync_directory)
    return calls


@pytest.mark.parametrize("durable", [False, True], ids=["not-durable", "durable"])
def test_atomic_file_replaces_the_target_and_syncs_the_directory_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    calls = _record_directory_syncs(monkeypatch, target)
    with _files.atomic_file(target, durable) as file:
        assert isinstance(file, _core.io.File)
        temp = Path(file.name)
        assert temp.parent == tmp_path and temp.name.startswith(".f.bin.ckptio-")
        assert temp.name.endswith(".tmp")
        _files.write_bytes(file, b"new")
        assert target.read_bytes() == b"old"  # nothing replaced before the block ends
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
    assert calls == ([f"{os.path.realpath(tmp_path)}:renamed"] if durable else [])


@pytest.mark.parametrize("durable", [False, True], ids=["not-durable", "durable"])
@pytest.mark.parametrize("exc", [ValueError("boom"), KeyboardInterrupt()], ids=repr)
def test_atomic_file_failure_keeps_the_target_and_removes_the_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool, exc: BaseException
) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    calls = _record_directory_syncs(monkeypatch, target)
    with pytest.raises(type(exc)), _files.atomic_file(target, durable) as file:
        _files.write_bytes(file, b"new")
        raise exc
    assert _listing(tmp_path) == {"f.bin": b"old"}
    assert calls == []  # nothing was renamed: no directory to sync


def test_atomic_file_removes_dead_writers_temporary_files(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / _files.temp_file_name("f.bin", dead.pid)
    stale.write_bytes(b"partial")
    with _files.atomic_file(tmp_path / "f.bin", durable=False) as file:
        _files.write_bytes(file, b"new")
    assert _listing(tmp_path) == {"f.bin": b"new"}


def test_atomic_file_refuses_what_a_rename_must_not_replace(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError), _files.atomic_file(tmp_path / "d", durable=False):
        pytest.fail("the block must not run")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OSError) as info, _files.atomic_file(fifo, durable=False):
        pytest.fail("the block must not run")
    assert info.value.errno == errno.EINVAL
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "pipe"]


def test_sync_directory_is_bound_and_reports_the_path(tmp_path: Path) -> None:
    _core.io.sync_directory(str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        _core.io.sync_directory(str(tmp_path / "missing"))
    assert info.value.errno == errno.ENOENT and info.value.filename == str(tmp_path / "missing")


@pytest.mark.filterwarnings(  # torch's single-process warning, in each supported torch's words
    "ignore:torch.distributed is (disabled, )?unavailable or uninitialized:UserWarning"
)
@pytest.mark.parametrize("durable", [False, True], ids=["not-durable", "durable"])
def test_dcp_metadata_is_written_atomically_and_durably(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    """The DCP writer's metadata goes through the same mechanism as save: a temporary file
    renamed into place, the directory synced after it when durable."""
    import torch.distributed.checkpoint as dcp

    from ckptio.dcp import METADATA_NAME, Writer

    directory_syncs: list[str] = []
    real = _core.io.sync_directory

    def sync_directory(path: str) -> None:
        directory_syncs.append(os.path.realpath(path))
        real(path)

    monkeypatch.setattr(_core.io, "sync_directory", sync_directory)
    dcp.save({"w": torch.arange(10.0)}, storage_writer=Writer(tmp_path, durable=durable))
    assert (tmp_path / METADATA_NAME).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert directory_syncs == ([os.path.realpath(tmp_path)] if durable else [])
