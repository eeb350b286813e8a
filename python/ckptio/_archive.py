"""torch's zip container: reading the record table of any torch archive, and the records of
ckptio's (which ones, their order and alignment: docs/format.md).

The byte layout lives in C++ (``_core.zip.read_zip_directory``, ``_core.zip.plan_archive``,
``_core.zip.ArchiveWriter``); writing records into a file is the save pipeline's (_writer.py).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Sequence, Union

from . import _core, _verify
from ._util import gc_paused
from .errors import CheckpointError
from .settings import get_options

__all__ = [
    "ArchiveReader",
    "Mispredicted",
    "Record",
    "archive_name_for",
    "check_version",
    "head_records",
    "tail_records",
]

Source = Union["_core.io.File", "_core.io.BufferSource"]


@dataclass(frozen=True)
class Record:
    name: str  # relative to the archive prefix
    data_offset: int
    size: int
    method: int


class Mispredicted(Exception):
    """A record's real local header differs from its prediction (:class:`ArchiveReader` with
    ``predict``): what was read with the predicted offsets is dropped and read again."""


class ArchiveReader:
    """The records of a torch zip archive, validated by the C++ reader.

    ``records`` maps each name (relative to the archive prefix) to its ``(data_offset, size,
    method)``: plain tuples, as an archive of 20,000 storages holds 20,000 of them.

    With ``predict`` (an eager load), the payload offsets may be predicted from the layout
    instead of read from each record's local header: for a local file out of the page cache
    (``_core.zip.read_zip_directory``'s ``predict_cold``: one random read per record saved
    before the first payload read) and for a remote object (``_remote``: one round of GETs
    saved). ``predicted`` then says so, and :meth:`check_predictions` must pass before
    anything read through them is kept; :meth:`reopen` reads the archive again without
    predictions.
    """

    def __init__(self, source: Source, predict: bool = False) -> None:
        self.source = source
        self.name = source.name
        opts = get_options()
        #: With the ``verify`` setting on: the checker of the CRC-32s the records declare,
        #: attached to `source` so that every read of it is checked (_verify.py); None when
        #: verify is off or the file recorded no CRCs.
        self.checker: _verify.RecordChecker | None = None
        #: the payload offsets were predicted and are not checked yet
        self.predicted = False
        # A remote source hands the C++ reader the bytes it reads as a BufferSource
        # (_remote/_source.py); payloads are still read from `source`.
        directory = getattr(source, "zip_directory_source", None)
        if directory is not None:
            source.predict_headers = predict  # type: ignore[union-attr]
        parsed = source if directory is None else directory()
        crcs: dict[str, int] | None = None
        with gc_paused():  # 20,000 new tuples would otherwise trigger full collections
            if predict and isinstance(parsed, _core.io.File):
                prefix, records, crcs, self.predicted = _core.zip.read_zip_directory(
                    parsed, opts.threads, opts.verify, predict_cold=True
                )
            elif opts.verify:
                prefix, records, crcs = _core.zip.read_zip_directory(parsed, opts.threads, True)
            else:
                prefix, records = _core.zip.read_zip_directory(parsed, opts.threads)
        if directory is not None:
            self.predicted = source.predicting  # type: ignore[union-attr]
        if crcs is not None:
            self.checker = _verify.checker_for(self.name, prefix, records, crcs)
            if self.checker is not None:
                _verify.attach(source, self.checker)
        self.prefix: str = prefix
        self.records: dict[str, tuple[int, int, int]] = records

    def check_predictions(self) -> None:
        """Checks the predicted payload offsets against the real local headers (read now:
        after the payload reads, mostly from the page cache); raises :class:`Mispredicted`
        if any differs. Nothing to do when nothing was predicted."""
        if not self.predicted:
            return
        check = getattr(self.source, "check_predictions", None)
        if check is not None:
            check()  # a remote source checks the headers its GETs fetched
        else:
            with gc_paused():
                _, real = _core.zip.read_zip_directory(self.source, get_options().threads)
            if real != self.records:
                wrong = next(n for n in self.records if real.get(n) != self.records[n])
                raise Mispredicted(
                    f"{self.name}: the local header of record '{self.prefix}{wrong}' is not "
                    "the predicted one"
                )
        self.predicted = False

    def forget_predictions(self) -> None:
        """Drops what the source keeps of its predictions (a remote source's predicted
        headers), after a misprediction, so that the next reader reads every header."""
        forget = getattr(self.source, "forget_predictions", None)
        if forget is not None:
            forget()

    def reopen(self) -> ArchiveReader:
        """The archive read again with every local header read, after a misprediction."""
        self.forget_predictions()
        return ArchiveReader(self.source)

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
        data = self.source.pread(rec.data_offset, rec.size)
        if self.checker is not None:
            self.checker.check_bytes(name, data)
        return data


def archive_name_for(target: object) -> str:
    """The archive name torch.save would pick: the file's stem for a path, else 'archive'."""
    if isinstance(target, (str, bytes)) or hasattr(target, "__fspath__"):
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
# storages can be written while the pickler finds them (_writer.save_object).
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


def check_version(archive: ArchiveReader) -> None:
    """Refuses (CheckpointError) an archive without a version record, or of a version torch
    does not read."""
    name = ".data/version" if archive.has(".data/version") else "version"
    if not archive.has(name):
        raise CheckpointError(
            f"{archive.name}: the archive has no version record; it is not a torch checkpoint"
        )
    raw = archive.read(name).strip()
    if not raw.isdigit() or not 1 <= int(raw) <= 10:
        raise CheckpointError(
            f"{archive.name}: unsupported archive version {raw[:20]!r} "
            "(torch reads versions 1 to 10)"
        )
