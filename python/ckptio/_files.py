"""File objects given to the loaders: which ones are read through their descriptor.

A file object's ``fileno()`` says where its descriptor is, not that the descriptor holds the
bytes the object reads: ``gzip.open``, ``bz2.open`` and ``lzma.open`` return the compressed
file's descriptor. So the descriptor fast path (parallel ``pread`` at archive offsets, and
``mmap``) is taken only for objects whose bytes are the descriptor's bytes, positioned at the
descriptor's offset 0: an ``io.FileIO``, or an ``io.BufferedReader``/``io.BufferedRandom`` over
one (what ``open(path, "rb")`` returns), of a regular file. Every other object is read through
its own ``read``, from its current position, as ``torch.load`` reads it, once it has passed
``torch.load``'s seekability check (a pipe, a socket or an object without ``seek`` and ``tell``
gets torch's error, with torch's advice).

The save side's destinations live here too: a path is written atomically (:func:`atomic_file`:
a recognisable temporary file beside the target, renamed over it once complete, removed on
failure; with ``durable``, the file and then its directory are fsynced), a file object is
written in place (:func:`write_to`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import secrets
import socket
import stat
import tempfile
import threading
from typing import IO, Any, Callable, Iterator, Sequence, TypeVar

from . import _core
from ._verify import checker_of
from .settings import Options, get_options

_T = TypeVar("_T")

__all__ = [
    "Source",
    "atomic_file",
    "descriptor_file",
    "display_name",
    "for_torch",
    "is_path",
    "open_source",
    "position",
    "read_into",
    "read_many",
    "remove_stale_temp_files",
    "stale_temp_names",
    "temp_file_name",
    "write_all",
    "write_bytes",
    "write_to",
]

Source = Any  # a _core.io.File or a _core.io.BufferSource: name, size, pread, read_into


def read_into(source: Source, requests: Any, base: int = 0, opts: Options | None = None) -> None:
    """Parallel reads of (offset, length, address) uint64 triples, each address relative to
    `base`, with the GIL released, under `opts` (``threads``, ``chunk_bytes``; by default the
    calling thread's settings)."""
    if len(requests):
        opts = opts or get_options()
        checker = checker_of(source)
        if checker is None:
            source.read_into(requests, opts.threads, opts.chunk_bytes, base)
        else:  # verify: each request's CRC-32, computed as it is read (_verify.py)
            crcs = source.read_into(requests, opts.threads, opts.chunk_bytes, base, True)
            if checker.check_reads(requests, crcs):
                checker.settle(source)


def read_many(batches: Sequence[tuple[Source, Any]], opts: Options | None = None) -> None:
    """:func:`read_into` over several sources as one parallel plan: `batches` holds
    (source, triples) pairs, each source a ``_core.io.File`` or ``BufferSource``."""
    opts = opts or get_options()
    checkers = [checker_of(s) for s, _ in batches]
    if not any(checkers):
        _core.io.read_many([(s, r, 0) for s, r in batches], opts.threads, opts.chunk_bytes)
        return
    # verify: each request's CRC-32, computed as it is read (_verify.py)
    crcs = _core.io.read_many([(s, r, 0) for s, r in batches], opts.threads, opts.chunk_bytes, True)
    assert crcs is not None
    at = 0
    for (source, requests), checker in zip(batches, checkers, strict=True):
        n = len(requests) // 3
        if checker is not None and checker.check_reads(requests, crcs[at : at + n]):
            checker.settle(source)
        at += n


_SEEKABLE_ADVICE = (
    ". You can only load from a file that is seekable. Please pre-load the data into a buffer "
    "like io.BytesIO and try to load from it instead."
)


def display_name(f: Any) -> str:
    name = getattr(f, "name", None)
    return str(name) if isinstance(name, (str, bytes)) else f"<{type(f).__name__}>"


def _plain_file(f: Any) -> Any:
    """f, or the object of the standard library whose bytes f reads, if f's bytes are its
    descriptor's bytes from the descriptor's current offset (else None)."""
    if isinstance(f, tempfile._TemporaryFileWrapper):  # NamedTemporaryFile: forwards to .file
        f = f.file
    if isinstance(f, io.FileIO):
        return f
    if isinstance(f, (io.BufferedReader, io.BufferedRandom)) and isinstance(
        getattr(f, "raw", None), io.FileIO
    ):
        return f
    return None


def descriptor_file(f: Any) -> _core.io.File | None:
    """A File over f's descriptor when f's bytes are that descriptor's bytes (see the module
    docstring) and f is an open, readable regular file positioned at its start, so archive
    offsets are file offsets; else None: the caller reads f through its own read()."""
    plain = _plain_file(f)
    if plain is None:
        return None
    try:
        if not plain.readable() or plain.tell() != 0:
            return None
        if isinstance(plain, io.BufferedRandom):
            plain.flush()  # bytes written through it reach the descriptor before any pread
        fd = plain.fileno()
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None  # a pipe, a FIFO or a device: read() tells what it holds
    except (OSError, ValueError):
        return None  # closed, or no position: read() raises what torch would meet
    return _core.io.File.adopt(fd, display_name(f))


def position(f: Any) -> int:
    """f's position, checked as torch.load checks a file object (``f.seek(f.tell())``), with
    torch's advice added to the error of a stream that cannot seek. Its exception types are
    torch's, and a pipe's OSError keeps its errno (ESPIPE), where torch lets it out bare."""
    try:
        seek = f.seek  # looked up first, as torch's f.seek(f.tell()) does
        start = f.tell()
        seek(start)
    except (io.UnsupportedOperation, AttributeError) as e:
        if "seek" in str(e) or "tell" in str(e):  # torch's test of its message
            raise type(e)(f"{e}{_SEEKABLE_ADVICE}") from None
        raise
    except OSError as e:
        if e.errno is None:
            raise
        raise type(e)(e.errno, f"{e.strerror}{_SEEKABLE_ADVICE}") from None
    if not isinstance(start, int):
        raise TypeError(f"f.tell() returned {type(start).__name__}, expected int")
    return start


def read_rest(f: Any) -> bytes:
    """The rest of the file object, from its current position (as torch.load reads it)."""
    data = f.read()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"f.read() returned {type(data).__name__}, expected bytes: open the file in binary mode"
        )
    return bytes(data)


def open_source(f: Any) -> tuple[Source, _core.io.File | None, int | None]:
    """(source, file to close or None, position to rewind f to before handing it on, or None)
    for a binary file object `f`: a File over its descriptor (see descriptor_file), or the
    bytes read from its position, once it has passed torch.load's seekability check."""
    file = descriptor_file(f)
    if file is not None:
        return file, file, None
    start = position(f)
    return _core.io.BufferSource(read_rest(f), display_name(f)), None, start


class _ThroughRead:
    """f without its descriptor: torch's legacy loader reads a file object with fileno()
    through that descriptor (it excepts gzip only), which for bz2 or lzma files is the
    compressed file. Everything else is f's own."""

    def __init__(self, f: Any) -> None:
        self._f = f

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def for_torch(f: Any, start: int | None) -> Any:
    """f to hand to torch.load after ckptio has looked at it: rewound to `start` (where
    ckptio's read began; None for a descriptor-backed file, whose position ckptio's preads
    left alone), and, if its bytes are not its descriptor's, without its descriptor."""
    if start is None:
        return f
    f.seek(start)
    return f if _plain_file(f) is not None else _ThroughRead(f)


# ------------------------------------------------------------------------------------- save
def is_path(f: object) -> bool:
    """Whether `f` names a file (str, bytes, os.PathLike) rather than being a file object."""
    return isinstance(f, (str, bytes, os.PathLike))


def write_to(f: Any, write: Callable[[Any], _T], durable: bool) -> _T:
    """Runs `write` on its destination: for a path, a _core.io.File over a temporary file that
    replaces the target atomically once `write` returns (:func:`atomic_file`), or, for a
    device, FIFO or socket, a file object opened on it, as torch.save would write it; else on
    the writable file object `f`, flushed after. Returns what `write` returns."""
    if not is_path(f):
        result = write(f)
        flush = getattr(f, "flush", None)
        if callable(flush):
            flush()
        return result
    path = os.fsdecode(f)
    target, mode = _replaceable_target(path)
    if mode is not None and not stat.S_ISREG(mode):
        # A device, FIFO or socket: write into it as torch.save would, never replace it.
        with open(target, "wb") as fh:
            return write(fh)
    with _atomic_file(path, target, mode, durable) as file:
        return write(file)


@contextlib.contextmanager
def atomic_file(path: str | bytes | os.PathLike, durable: bool) -> Iterator[_core.io.File]:
    """An open _core.io.File over a new temporary file beside `path` (through a symlink: beside
    its target), renamed over the target once the block completes; removed, the target
    untouched, when the block raises. With `durable`, the file is fsynced before the rename
    and the directory after it, so the new name survives a power loss once the block exits.

    Refuses as ``open(path, "wb")`` would: a directory (IsADirectoryError), a target the
    caller may not write (PermissionError); a device, FIFO or socket, which a rename would
    replace, is refused too (use :func:`write_to` to write into one)."""
    path = os.fsdecode(path)
    target, mode = _replaceable_target(path)
    if mode is not None and not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, "not a regular file; it cannot be replaced", path)
    with _atomic_file(path, target, mode, durable) as file:
        yield file


def _replaceable_target(path: str) -> tuple[str, int | None]:
    """(the file a write to `path` lands in, its st_mode or None when it does not exist),
    refused as open(path, "wb") refuses it: a directory, or a file the caller may not write
    (a rename would replace it all the same)."""
    # Write through a symlink to its target, as open(path, "wb") would.
    target = os.path.realpath(path) if os.path.islink(path) else path
    try:
        mode: int | None = os.stat(target).st_mode
    except FileNotFoundError:
        return target, None
    assert mode is not None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if stat.S_ISREG(mode) and not os.access(target, os.W_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
    return target, mode


@contextlib.contextmanager
def _atomic_file(
    path: str, target: str, mode: int | None, durable: bool
) -> Iterator[_core.io.File]:
    directory = os.path.dirname(os.path.abspath(target))
    base = os.path.basename(target)
    remove_stale_temp_files(directory, base)
    tmp = os.path.join(directory, temp_file_name(base, os.getpid()))
    try:
        # 0o666 minus the umask, as a plain open() would; an existing target keeps its mode.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except OSError as e:  # report the caller's path, not the temporary name
        raise type(e)(e.errno, e.strerror, path) from None
    try:
        if mode is not None:
            os.fchmod(fd, stat.S_IMODE(mode))
        file = _core.io.File.adopt(fd, tmp)
        os.close(fd)
        fd = -1
        with file:
            yield file
            if durable:
                file.sync()
        replaced = _hold(target) if mode is not None else -1
        try:
            os.replace(tmp, target)
        finally:
            if replaced >= 0:
                _close_in_background(replaced)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        _core.io.sync_directory(directory)


def _hold(path: str) -> int:
    """A read-only descriptor of the file a save is about to replace, or -1. Held across the
    rename, it makes the last close, not the rename, free the old file (its blocks and page
    cache: 40 ms for 700 MB here), and _close_in_background moves that off the save."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return -1  # unreadable (write-only mode): the rename frees it, as before


def _close_in_background(fd: int) -> None:
    threading.Thread(target=os.close, args=(fd,), name="ckptio-release", daemon=True).start()


# Temporary files are named ".<target name>.ckptio-<host>-<pid>-<random>.tmp": hidden, beside
# the target, recognisable, and carrying their writer. A writer killed mid-save (SIGKILL, OOM
# killer) leaves one behind; the next save to the same target removes those whose writer ran
# on this host and is no longer alive (docs/training.md, "Crash semantics").
_TEMP_MARK = ".ckptio-"
_HOST_TAG = hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


def temp_file_name(base: str, pid: int) -> str:
    """The name of a temporary file of a save to `base` by process `pid` on this host."""
    return f".{base}{_TEMP_MARK}{_HOST_TAG}-{pid}-{secrets.token_hex(4)}.tmp"


def stale_temp_names(directory: str, base: str) -> list[str]:
    """The names in `directory` that :func:`temp_file_name` gave saves to `base` by
    processes of this host that are dead (killed mid-save): what no one will finish or
    remove. Empty when `directory` cannot be listed."""
    prefix = f".{base}{_TEMP_MARK}{_HOST_TAG}-"
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix) and n.endswith(".tmp")]
    except OSError:
        return []
    stale = []
    for name in names:
        pid_text = name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            stale.append(name)
    return stale


def remove_stale_temp_files(directory: str, base: str) -> list[str]:
    """Removes the temporary files of saves to `base` whose writer, a process of this host,
    is dead; returns their names. Best effort: errors are ignored (the save goes on)."""
    removed: list[str] = []
    for name in stale_temp_names(directory, base):
        try:
            os.unlink(os.path.join(directory, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process may be writing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def write_all(f: IO[bytes], data: bytes | memoryview) -> None:
    """Writes all of `data` into the file object `f`: raw (unbuffered) file objects may write
    less than asked, so this loops like a careful writer."""
    view = memoryview(data)
    while view.nbytes:
        n = f.write(view)
        if n is None or n >= view.nbytes:
            return
        view = view[n:]


def write_bytes(file: _core.io.File, data: bytes | bytearray | memoryview, offset: int = 0) -> None:
    """Writes all of `data` into `file` at `offset` (pwrite: the file has no position)."""
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.pwrite(file.fd, view, offset)
        offset += n
        view = view[n:]
