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
"""

from __future__ import annotations

import io
import os
import stat
import tempfile
from typing import Any

from . import _core
from .settings import Options, get_options

__all__ = [
    "Source",
    "descriptor_file",
    "display_name",
    "for_torch",
    "open_source",
    "position",
    "read_into",
]

Source = Any  # a _core.File or a _core.BufferSource: name, size, pread, read_into


def read_into(source: Source, requests: Any, base: int = 0, opts: Options | None = None) -> None:
    """Parallel reads of (offset, length, address) uint64 triples, each address relative to
    `base`, with the GIL released, under `opts` (``threads``, ``chunk_bytes``; by default the
    calling thread's settings)."""
    if len(requests):
        opts = opts or get_options()
        source.read_into(requests, opts.threads, opts.chunk_bytes, base)


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


def descriptor_file(f: Any) -> _core.File | None:
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
    return _core.File.adopt(fd, display_name(f))


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


def open_source(f: Any) -> tuple[Source, _core.File | None, int | None]:
    """(source, file to close or None, position to rewind f to before handing it on, or None)
    for a binary file object `f`: a File over its descriptor (see descriptor_file), or the
    bytes read from its position, once it has passed torch.load's seekability check."""
    file = descriptor_file(f)
    if file is not None:
        return file, file, None
    start = position(f)
    return _core.BufferSource(read_rest(f), display_name(f)), None, start


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
