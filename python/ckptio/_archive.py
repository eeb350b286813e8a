"""torch's zip container: reading the record table of any torch archive, writing ckptio's.

The byte layout lives in C++ (``_core.plan_archive``, ``_core.ArchiveWriter``); this module
chooses the records, their order and alignment (docs/format.md)
and moves the bytes: into a file descriptor by the ArchiveWriter's threads (during pickling, for
a save), or sequentially into a writable file object.
"""

from __future__ import annotations

import array
import hashlib
import sys
from dataclasses import dataclass
from typing import IO, Sequence, Union

from . import _core
from ._files import read_into
from ._staging import DevicePayload, payload_size, write_payloads_at
from ._util import gc_paused
from .settings import get_options

__all__ = [
    "ArchiveReader",
    "Record",
    "archive_name_for",
    "archive_writer",
    "finish_archive",
    "head_records",
    "tail_records",
    "torch_records",
    "write_all",
    "write_archive",
]

META_ALIGNMENT = 64
#: Payload: a bytes-like object, an (address, nbytes) pair of memory the caller keeps alive, or
#: a storage in device memory (streamed through the staging ring, see _staging.py).
Payload = Union[bytes, bytearray, memoryview, "tuple[int, int]", DevicePayload]
Source = Union["_core.File", "_core.BufferSource"]


@dataclass(frozen=True)
class Record:
    name: str  # relative to the archive prefix
    data_offset: int
    size: int
    method: int


class ArchiveReader:
    """The records of a torch zip archive, validated by the C++ reader.

    ``records`` maps each name (relative to the archive prefix) to its ``(data_offset, size,
    method)``: plain tuples, as an archive of 20,000 storages holds 20,000 of them.
    """

    def __init__(self, source: Source) -> None:
        self.source = source
        self.name = source.name
        with gc_paused():  # 20,000 new tuples would otherwise trigger full collections
            prefix, records = _core.read_zip_directory(source, get_options().threads)
        self.prefix: str = prefix
        self.records: dict[str, tuple[int, int, int]] = records

    def has(self, name: str) -> bool:
        return name in self.records

    def record(self, name: str) -> Record:
        try:
            data_offset, size, method = self.records[name]
        except KeyError:
            raise _core.CheckpointError(
                f"{self.name}: the archive has no record '{self.prefix}{name}'"
            ) from None
        if method != 0:
            raise _core.CheckpointError(
                f"{self.name}: record '{self.prefix}{name}' is compressed (zip method "
                f"{method}); torch checkpoints store records uncompressed"
            )
        return Record(name, data_offset, size, method)

    def read(self, name: str) -> bytes:
        rec = self.record(name)
        return self.source.pread(rec.data_offset, rec.size)

    def read_many(self, requests: array.array) -> None:
        """Parallel reads of (offset, length, address) triples, GIL released."""
        read_into(self.source, requests)


def archive_name_for(target: object) -> str:
    """The archive name torch.save would pick: the file's stem for a path, else 'archive'."""
    if isinstance(target, (str, bytes)) or hasattr(target, "__fspath__"):
        import os

        base = os.path.basename(os.fsdecode(target))  # type: ignore[arg-type]
        stem = base[: base.rfind(".")] if "." in base else base
        if stem and stem.isascii() and stem.isprintable():
            return stem
    return "archive"


def _serialization_id(names: Sequence[str], pickle_bytes: bytes) -> bytes:
    # torch writes 20 digits hashing the record names + 20 digits of combined CRC and only
    # logs the value; ckptio writes a deterministic 40-digit value of the same shape.
    h = hashlib.blake2b(digest_size=16)
    h.update("".join([n + "\0" for n in names]).encode())  # each name, then a NUL
    h.update(pickle_bytes)
    d = h.digest()
    a = int.from_bytes(d[:8], "little") % 10**20
    b = int.from_bytes(d[8:], "little") % 10**20
    return f"{a:020d}{b:020d}".encode()


# The layout (docs/format.md): torch's records, with data.pkl after the storages, so that the
# storages can be written while the pickler finds them (save_archive).
def head_records(data_alignment: int, byteorder: str | None) -> list[tuple[str, bytes]]:
    """The records before the storages."""
    head = [(".format_version", b"1"), (".storage_alignment", str(data_alignment).encode())]
    if byteorder is not None:
        head.append(("byteorder", byteorder.encode()))
    return head


def tail_records(
    head: Sequence[tuple[str, bytes]], n_storages: int, pickle_bytes: bytes
) -> list[tuple[str, bytes]]:
    """The records after the storages."""
    names = [n for n, _ in head]
    names += ["data/" + str(key) for key in range(n_storages)]
    names += ["data.pkl", "version"]
    return [
        ("data.pkl", pickle_bytes),
        ("version", b"3\n"),
        (".data/serialization_id", _serialization_id(names, pickle_bytes)),
    ]


def torch_records(
    pickle_bytes: bytes,
    storages: Sequence[Payload],
    *,
    data_alignment: int,
    byteorder: str | None = sys.byteorder,
) -> tuple[list[tuple[str, int, int]], list[Payload]]:
    """The records of an archive, in file order, as (name, size, alignment) + payloads."""
    head = head_records(data_alignment, byteorder)
    specs = [(n, len(p), META_ALIGNMENT) for n, p in head]
    payloads: list[Payload] = [p for _, p in head]
    # One pass, no call per storage: 20,000 small storages make this loop show.
    specs += [
        ("data/" + str(key), p[1] if type(p) is tuple else payload_size(p), data_alignment)
        for key, p in enumerate(storages)
    ]
    payloads += storages
    for n, p in tail_records(head, len(storages), pickle_bytes):
        specs.append((n, len(p), META_ALIGNMENT))
        payloads.append(p)
    return specs, payloads


def _require_crc32(crc32: bool) -> None:
    if crc32 and not _core.crc32_available():
        raise RuntimeError("ckptio was built without zlib: crc32=True is unavailable")


def archive_writer(file: _core.File, archive_name: str, crc32: bool) -> _core.ArchiveWriter:
    _require_crc32(crc32)
    opts = get_options()
    return _core.ArchiveWriter(
        file, archive_name, opts.threads, opts.write_chunk_bytes, crc32, opts.preallocate
    )


def finish_archive(
    writer: _core.ArchiveWriter,
    file: _core.File,
    reserved: Sequence[tuple[int, Payload]],
    crc32: bool,
) -> None:
    """Writes the payloads of the `reserved` (index, payload) records, then the end."""
    placed = [(i, writer.data_offset(i), p) for i, p in reserved]
    crcs = write_payloads_at(file, placed, crc32=crc32)
    writer.finish(sorted(crcs.items()))


def write_archive(
    target: _core.File | IO[bytes],
    archive_name: str,
    specs: Sequence[tuple[str, int, int]],
    payloads: Sequence[Payload],
    *,
    crc32: bool,
) -> list[int]:
    """Writes an archive of records whose payloads all exist: into a _core.File by the
    ArchiveWriter (device payloads through the staging ring), into a file object by
    sequential writes. Returns each record's data offset."""
    _require_crc32(crc32)
    if isinstance(target, _core.File):
        writer = archive_writer(target, archive_name, crc32)
        try:
            reserved: list[tuple[int, Payload]] = []
            for (name, size, alignment), p in zip(specs, payloads, strict=True):
                if isinstance(p, DevicePayload):
                    reserved.append((writer.reserve(name, alignment, size), p))
                elif isinstance(p, tuple):
                    writer.add(name, alignment, p[0], p[1])
                else:
                    writer.add_bytes(name, alignment, p)
            offsets = [writer.data_offset(i) for i in range(len(specs))]
            finish_archive(writer, target, reserved, crc32)
        except BaseException:
            writer.abandon()
            raise
        return offsets
    layout = _core.plan_archive(archive_name, list(specs))
    crcs = []
    for i, payload in enumerate(payloads):
        host = payload.storage.cpu() if isinstance(payload, DevicePayload) else None
        view = _payload_view(payload if host is None else (host.data_ptr(), host.nbytes()))
        write_all(target, layout.local_header(i))
        write_all(target, view)
        crc = _core.crc32(view) if crc32 else 0
        crcs.append(crc)
        write_all(target, layout.data_descriptor(i, crc))
    write_all(target, layout.central_directory(crcs))
    return list(layout.data_offsets)


def _payload_view(payload: Payload) -> memoryview:
    if isinstance(payload, DevicePayload):
        raise TypeError("a device payload has no host view; copy it to the CPU first")
    if isinstance(payload, tuple):
        address, nbytes = payload
        return _core.raw_memoryview(address, nbytes) if nbytes else memoryview(b"")
    return memoryview(payload).cast("B")


def write_all(f: IO[bytes], data: bytes | memoryview) -> None:
    # Raw (unbuffered) file objects may write less than asked; loop like a careful writer.
    view = memoryview(data)
    while view.nbytes:
        n = f.write(view)
        if n is None or n >= view.nbytes:
            return
        view = view[n:]
