"""Verified bytes: the CRC-32s of torch zip records checked while reading, and manifests of
per-file digests for safetensors files and model directories (docs/verify.md).

**Records** (torch zip files). With the ``verify`` setting on (``load(..., verify=True)``),
an :class:`~ckptio._archive.ArchiveReader` reads the CRC-32 every central directory entry
declares and attaches a :class:`RecordChecker` to its source (:func:`attach`). Every reader
of that source then checks what it reads, whichever path the bytes take:

* host reads (``_reads.ReadBatch``, the loader's background read of small storages): the
  C++ read computes each request's CRC-32 from the destination right after reading it
  (``read_into(..., crc32=True)``) and :meth:`RecordChecker.check_reads` compares those that
  are whole records;
* device reads through the pinned staging ring: the CRC of each piece is computed on the
  pinned slot before it is copied to the device, and the pieces of a record are combined;
* mappings (``mmap=True``): :meth:`RecordChecker.check_mapping` checksums every data record
  of the mapping, which touches every page of them;
* reads of part of a record (a slice): the record is read again whole, through small
  buffers, when the batch ends (:meth:`RecordChecker.settle`).

A mismatch raises :class:`CorruptRecord`, a ``CheckpointError`` naming the file and the
record (the entry points add the tensors that view it). A file whose non-empty records all
declare CRC 0 recorded none (``write_crc32`` off, or ``torch.serialization`` with
``compute_crc32=False``): it cannot be verified, and the load warns (:class:`UnverifiedWarning`,
once per file and call site) instead of failing. In a file that recorded CRCs, a record
declaring 0 is checked like any other (0 is the CRC of one 32-bit pattern in 2**32).

**Manifests** (any file; what safetensors files and directories have instead of record CRCs).
A manifest is a JSON file beside the files it covers::

    {"format": "ckptio.manifest", "version": 1, "algorithm": "crc32",
     "files": {"model-00001-of-00002.safetensors": {"size": 5000000000, "crc32": "89abcdef"},
               ...}}

File names are relative to the manifest's directory (no ``..``, no absolute paths). The
digest is the zip CRC-32 of the whole file (8 lowercase hex digits), ckptio's own
hardware-accelerated one: no dependency, computed in parallel pieces and combined, from the
buffers being written. Names: :data:`MANIFEST_NAME` in a model directory,
``<file>`` + :data:`MANIFEST_SUFFIX` beside a single file.

The contract for writers (the directory save, ``_shard_writer``):

1. for each file written, call :func:`manifest_entry` with its name, size and the CRC-32 of
   its bytes: either from the pieces written in file order (what the writers return with
   ``file_crc32=True``: ``_writer.write_placed``, ``_writer.save_object``; or
   :func:`combine`) or, for a file another writer made (torch's legacy format),
   :func:`file_crc32`;
2. once every file is complete, :func:`write_manifest` (directory, entries) writes the
   manifest atomically, in the same temporary directory as the files, before it is swapped
   into place;
3. readers call :func:`check_manifest` (directory or file), which re-reads every listed file
   in parallel (GIL released) and raises :class:`CorruptRecord` naming the first file whose
   size or digest differs.
"""

from __future__ import annotations

import array
import bisect
import ctypes
import json
import os
import threading
import warnings
import weakref
from typing import Any, Callable, Iterable, Mapping, Sequence

from . import _core
from .errors import CheckpointError
from .settings import get_options

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_SUFFIX",
    "CorruptRecord",
    "RecordChecker",
    "UnverifiedWarning",
    "attach",
    "check_manifest",
    "checker_of",
    "combine",
    "file_crc32",
    "manifest_entry",
    "manifest_path",
    "read_manifest",
    "write_manifest",
]

MANIFEST_NAME = "ckptio.manifest.json"
MANIFEST_SUFFIX = ".ckptio.manifest.json"
_FORMAT = "ckptio.manifest"
_VERSION = 1
_ALGORITHM = "crc32"
_PROGRESS_STEP = 256 << 20
_WHOLE_FILE = "the whole file"


class UnverifiedWarning(UserWarning):
    """A load asked to verify a file that records no checksums (no CRC-32 in its zip
    records, no manifest): its bytes were read unchecked. Make it an error with
    ``warnings.simplefilter("error", ckptio.UnverifiedWarning)``."""


class CorruptRecord(CheckpointError):
    """A record (or a file of a manifest) whose bytes do not match its stored checksum."""

    def __init__(self, file: str, record: str, stored: int, found: int, what: str = "") -> None:
        self.file = file
        self.record = record
        self.stored = stored
        self.found = found
        self.what = what
        super().__init__(self._message())

    def _message(self) -> str:
        if self.what == _WHOLE_FILE:
            return (
                f"{self.file}: fails the CRC-32 its manifest lists for '{self.record}': stored "
                f"{self.stored:08x}, read {self.found:08x}; the file is corrupt"
            )
        of = f" ({self.what})" if self.what else ""
        return (
            f"{self.file}: record '{self.record}'{of} fails its CRC-32 check: stored "
            f"{self.stored:08x}, read {self.found:08x}; the file is corrupt"
        )

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Rebuilt from its fields, not its message (a process pool pickles errors).
        return (CorruptRecord, (self.file, self.record, self.stored, self.found, self.what))

    def naming(self, what: str) -> CorruptRecord:
        """The same error naming what the record holds (tensors)."""
        return CorruptRecord(self.file, self.record, self.stored, self.found, what)


# ---------------------------------------------------------------------------- zip records
class RecordChecker:
    """The CRC-32 each record of one torch zip archive declares, and the checks of bytes
    read from it. Thread-safe: the ring's reader threads report pieces concurrently."""

    def __init__(
        self,
        file: str,
        prefix: str,
        records: Mapping[str, tuple[int, int, int]],
        crcs: Mapping[str, int],
    ) -> None:
        self.file = file
        self.prefix = prefix
        self._crcs = dict(crcs)
        # data offset -> (size, stored CRC, name) of every non-empty record
        self._by_offset: dict[int, tuple[int, int, str]] = {
            offset: (size, self._crcs.get(name, 0), name)
            for name, (offset, size, _) in records.items()
            if size
        }
        self._sorted: list[int] | None = None  # record offsets in file order, when needed
        self._lock = threading.Lock()
        # record offset -> [(start within the record, length, crc)] of partial reads
        self._pieces: dict[int, list[tuple[int, int, int]]] = {}
        self._mapping_checked = False

    @property
    def _starts(self) -> list[int]:
        # Sorted only for partial reads, mappings and ckptio verify: a load that reads whole
        # records never pays for sorting 20,000 offsets.
        if self._sorted is None:
            self._sorted = sorted(self._by_offset)
        return self._sorted

    # -- what is read -----------------------------------------------------------------------
    def check_reads(self, requests: Sequence[int], crcs: Sequence[int] | None) -> bool:
        """Checks reads: `requests` flat (offset, length, address) triples and the CRC the
        C++ read computed for each. A request that is a whole record is compared at once;
        others are kept as pieces for :meth:`settle`. Returns whether any was kept."""
        if crcs is None:
            raise RuntimeError("a verified read returned no CRC-32s")
        by_offset = self._by_offset
        kept = False
        for offset, length, crc in zip(requests[0::3], requests[1::3], crcs, strict=True):
            entry = by_offset.get(offset)
            if entry is not None and entry[0] == length:
                if entry[1] != crc:
                    raise CorruptRecord(self.file, entry[2], entry[1], crc)
            elif length:
                self.add_piece(offset, length, crc)
                kept = True
        return kept

    def add_piece(self, offset: int, length: int, crc: int) -> None:
        """Records the CRC of `length` bytes read at `offset` that are part of a record (a
        ring fill's piece, a slice); checked by :meth:`settle` once the record is complete.
        Bytes outside every record (headers) are ignored; a range over several records is
        noted for each, which :meth:`settle` then reads again."""
        starts = self._starts
        i = max(bisect.bisect_right(starts, offset) - 1, 0)
        end = offset + length
        with self._lock:
            while i < len(starts) and starts[i] < end:
                start = starts[i]
                size = self._by_offset[start][0]
                if offset < start + size:  # overlaps this record
                    pieces = self._pieces.setdefault(start, [])
                    if start <= offset and end <= start + size:
                        pieces.append((offset - start, length, crc))
                    else:
                        pieces.append((-1, 0, 0))  # spans a boundary: read it again
                i += 1

    def settle(self, source: Any) -> None:
        """Checks every record read in pieces since the last call: pieces that tile it are
        combined; a record read only in part is read again whole (through small buffers,
        nothing kept) from `source`."""
        with self._lock:
            pending, self._pieces = self._pieces, {}
        again: list[int] = []
        for start, pieces in pending.items():
            size, stored, name = self._by_offset[start]
            crc = _tiled_crc(pieces, size)
            if crc is None:
                again.append(start)
            elif crc != stored:
                raise CorruptRecord(self.file, name, stored, crc)
        if again:
            self._check_ranges(source, again)

    def check_mapping(self, mapping: Any) -> None:
        """Checksums every data record of the file through its mapping (touching every page
        of them), once per checker."""
        if self._mapping_checked:
            return
        starts = [s for s in self._starts if self._by_offset[s][2].startswith("data/")]
        ranges = array.array("Q")
        for s in starts:
            ranges.extend((s, self._by_offset[s][0]))
        opts = get_options()
        found = _core.zip.crc32_ranges(mapping, ranges, opts.threads, opts.chunk_bytes)
        self._compare(starts, found)
        self._mapping_checked = True

    def check_bytes(self, name: str, data: bytes) -> None:
        """Checks a record read whole into `data` (data.pkl, version...)."""
        if not data:
            return
        stored = self._crcs.get(name, 0)
        found = _core.zip.crc32(data)
        if found != stored:
            raise CorruptRecord(self.file, name, stored, found)

    def _check_ranges(self, source: Any, starts: list[int]) -> None:
        ranges = array.array("Q")
        for s in starts:
            ranges.extend((s, self._by_offset[s][0]))
        self._compare(starts, _checksum_ranges(source, ranges))

    def check_all(self, source: Any, progress: Callable[[int], None] | None = None) -> list[str]:
        """Reads every record of `source` (in parallel, through small buffers, nothing kept)
        and returns the names of those whose CRC-32 differs from the stored one (``ckptio
        verify``). `progress` is called with the bytes checked, about every 256 MiB."""
        opts = get_options()
        bad: list[str] = []
        group: list[int] = []
        size = 0
        for i, start in enumerate(self._starts):
            group.append(start)
            size += self._by_offset[start][0]
            if size < _PROGRESS_STEP and i + 1 < len(self._starts):
                continue
            ranges = array.array("Q")
            for s in group:
                ranges.extend((s, self._by_offset[s][0]))
            found = _checksum_ranges(source, ranges, opts)
            bad += [
                self._by_offset[s][2]
                for s, crc in zip(group, found, strict=True)
                if crc != self._by_offset[s][1]
            ]
            if progress is not None:
                progress(size)
            group, size = [], 0
        return bad

    @property
    def data_bytes(self) -> int:
        """Bytes of every non-empty record."""
        return sum(size for size, _, _ in self._by_offset.values())

    def _compare(self, starts: Sequence[int], found: Sequence[int]) -> None:
        for start, crc in zip(starts, found, strict=True):
            size, stored, name = self._by_offset[start]
            if crc != stored:
                raise CorruptRecord(self.file, name, stored, crc)

    @property
    def record_count(self) -> int:
        """Non-empty records, each with a stored CRC."""
        return len(self._by_offset)


def _checksum_ranges(source: Any, ranges: array.array, opts: Any = None) -> list[int]:
    """The CRC-32 of each (offset, length) pair of `ranges` read from `source`, nothing
    kept: the C++ ``checksum_ranges`` of a File or BufferSource; for a source of its own kind
    (a remote object, _remote) its checksummed ``read_into`` through a scratch buffer."""
    opts = opts or get_options()
    if hasattr(source, "checksum_ranges"):
        return list(source.checksum_ranges(ranges, opts.threads, opts.chunk_bytes))
    step = max(opts.chunk_bytes, 1 << 20)
    scratch = bytearray(min(step, max(ranges[1::2], default=0)) or 1)
    buffer = (ctypes.c_char * len(scratch)).from_buffer(scratch)
    out = []
    for offset, length in zip(ranges[0::2], ranges[1::2], strict=True):
        crc = 0
        for at in range(offset, offset + length, len(scratch)):
            n = min(len(scratch), offset + length - at)
            request = array.array("Q", (at, n, ctypes.addressof(buffer)))
            piece = source.read_into(request, opts.threads, opts.chunk_bytes, 0, True)
            crc = _core.zip.crc32_combine(crc, piece[0], n)
        out.append(crc)
    return out


def _tiled_crc(pieces: list[tuple[int, int, int]], size: int) -> int | None:
    """The CRC of a record from pieces (start, length, crc) that tile it exactly (the same
    piece may have been read twice), else None."""
    crc = 0
    at = 0
    for start, length, piece_crc in sorted(set(pieces)):
        if start < 0 or start > at:
            return None  # spans a boundary, or a gap
        if start < at:
            if start + length <= at:
                continue  # read again, already counted
            return None  # overlapping pieces of different extents: read it again whole
        crc = _core.zip.crc32_combine(crc, piece_crc, length)
        at += length
    return crc if at == size else None


class FileChecker:
    """The whole-file CRC-32 a manifest lists for one file, checked from the reads of it.

    Every piece a load reads is kept as (offset, length, CRC-32 computed as it was read);
    :meth:`finish` reads only what no read covered (a safetensors header, padding, tensors a
    load skipped), combines everything in file order and compares. A mapped load checksums
    the whole mapping instead (:meth:`check_mapping`). Has :class:`RecordChecker`'s reading
    interface, so every read path feeds it the same way."""

    def __init__(self, file: str, name: str, size: int, crc: int) -> None:
        self.file = file
        self.name = name
        self.size = size
        self.crc = crc
        self._lock = threading.Lock()
        self._pieces: list[tuple[int, int, int]] = []
        self._done = False

    def check_reads(self, requests: Sequence[int], crcs: Sequence[int] | None) -> bool:
        """Keeps the CRC of every (offset, length, address) request read; checked by
        :meth:`finish`. Returns False: nothing to settle before then."""
        if crcs is None:
            raise RuntimeError("a verified read returned no CRC-32s")
        pieces = [
            (o, n, c) for o, n, c in zip(requests[0::3], requests[1::3], crcs, strict=True) if n
        ]
        with self._lock:
            self._pieces += pieces
        return False

    def add_piece(self, offset: int, length: int, crc: int) -> None:
        if length:
            with self._lock:
                self._pieces.append((offset, length, crc))

    def settle(self, source: Any) -> None:
        """Nothing until :meth:`finish`: a file is checked whole, once its reads are done."""

    def check_mapping(self, mapping: Any) -> None:
        """Checksums the whole file through its mapping (touching every page), once."""
        if self._done:
            return
        opts = get_options()
        ranges = array.array("Q", (0, self.size))
        self._compare(_core.zip.crc32_ranges(mapping, ranges, opts.threads, opts.chunk_bytes)[0])

    def finish(self, source: Any) -> None:
        """Checks the file: the CRCs of the pieces read, and of what they left out (read
        now, through small buffers), combined in file order against the manifest's."""
        if self._done:
            return
        if source.size != self.size:
            raise CheckpointError(
                f"{self.file}: {source.size} bytes where the manifest says {self.size}; the "
                "file is truncated or was replaced"
            )
        with self._lock:
            pieces, self._pieces = sorted(set(self._pieces)), []
        segments: list[tuple[int, int, int | None]] = []
        at = 0
        for start, length, crc in pieces:
            if start < at:
                if start + length <= at:
                    continue  # inside bytes already covered (read twice)
                segments = [(0, self.size, None)]  # pieces overlap unevenly: read it all
                at = self.size
                break
            if start > at:
                segments.append((at, start - at, None))
            segments.append((start, length, crc))
            at = start + length
        if at < self.size:
            segments.append((at, self.size - at, None))
        gaps = array.array("Q")
        for start, length, piece in segments:
            if piece is None:
                gaps.extend((start, length))
        found = iter(_checksum_ranges(source, gaps) if len(gaps) else [])
        total = 0
        for _, length, piece in segments:
            value = next(found) if piece is None else piece
            total = _core.zip.crc32_combine(total, value, length)
        self._compare(total)

    def _compare(self, found: int) -> None:
        self._done = True
        if found != self.crc:
            raise CorruptRecord(self.file, self.name, self.crc, found, _WHOLE_FILE)


def recorded(records: Mapping[str, tuple[int, int, int]], crcs: Mapping[str, int]) -> bool:
    """Whether an archive recorded CRC-32s: some non-empty record declares one that is not
    0. (All zero is what a writer without CRCs leaves; with CRCs, each non-empty record has
    its CRC, and all of them being 0 has a chance of 2**-32 per record.)"""
    return any(crcs.get(name, 0) for name, (_, size, _) in records.items() if size)


def checker_for(
    file: str, prefix: str, records: Mapping[str, tuple[int, int, int]], crcs: Mapping[str, int]
) -> RecordChecker | None:
    """The checker of an archive read with ``verify`` on, or None (with an
    :class:`UnverifiedWarning`) when it recorded no CRCs."""
    if not recorded(records, crcs):
        warnings.warn(
            f"{file}: the file records no CRC-32s (all zero: written without write_crc32), so "
            "its bytes cannot be verified; loaded unchecked",
            UnverifiedWarning,
            stacklevel=4,
        )
        return None
    return RecordChecker(file, prefix, records, crcs)


_checkers: weakref.WeakKeyDictionary[Any, RecordChecker | FileChecker] = weakref.WeakKeyDictionary()
_checkers_lock = threading.Lock()


def attach(source: Any, checker: RecordChecker | FileChecker) -> None:
    """Makes every read of `source` (a ``_core.io.File`` or ``BufferSource``) check its
    bytes with `checker`, for as long as the source lives."""
    with _checkers_lock:
        _checkers[source] = checker


def checker_of(source: Any) -> RecordChecker | FileChecker | None:
    """The checker attached to `source`, if any (a dictionary lookup: what a read costs
    when ``verify`` is off)."""
    if not _checkers:
        return None
    try:
        return _checkers.get(source)
    except TypeError:  # a source that cannot be referenced weakly has no checker
        return None


# ------------------------------------------------------------------------------- manifests
def combine(parts: Iterable[tuple[int, int]]) -> int:
    """The CRC-32 of consecutive pieces, given as (crc, length) in file order."""
    crc = 0
    for piece_crc, length in parts:
        crc = _core.zip.crc32_combine(crc, piece_crc, length)
    return crc


def file_crc32(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(size, CRC-32) of a whole file, read in parallel through small buffers (GIL
    released)."""
    opts = get_options()
    with _core.io.File.open(os.fspath(path), _core.io.FileMode.READ) as f:
        size = f.size
        crcs = f.checksum_ranges(array.array("Q", (0, size)), opts.threads, opts.chunk_bytes)
    return size, crcs[0]


def manifest_entry(name: str, size: int, crc32: int) -> tuple[str, dict[str, Any]]:
    """One file of a manifest: its name relative to the manifest's directory (checked),
    its size in bytes and the CRC-32 of its bytes."""
    _check_name(name)
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"manifest entry {name!r}: size must be an int >= 0, got {size!r}")
    if not isinstance(crc32, int) or not 0 <= crc32 < 1 << 32:
        raise ValueError(f"manifest entry {name!r}: crc32 must be a 32-bit int, got {crc32!r}")
    return name, {"size": size, _ALGORITHM: f"{crc32:08x}"}


def manifest_path(path: str | os.PathLike[str]) -> str:
    """Where the manifest of `path` lives: ``<dir>/ckptio.manifest.json`` for a directory,
    ``<file>.ckptio.manifest.json`` beside a file."""
    p = os.fspath(path)
    if os.path.isdir(p):
        return os.path.join(p, MANIFEST_NAME)
    return p + MANIFEST_SUFFIX


def write_manifest(
    directory: str | os.PathLike[str],
    entries: Iterable[tuple[str, dict[str, Any]]],
    name: str = MANIFEST_NAME,
) -> str:
    """Writes the manifest of `entries` (from :func:`manifest_entry`) as `name` in
    `directory`, atomically (a temporary sibling renamed into place); returns its path."""
    _check_name(name)
    files = dict(entries)
    doc = {"format": _FORMAT, "version": _VERSION, "algorithm": _ALGORITHM, "files": files}
    path = os.path.join(os.fspath(directory), name)
    temp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(temp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    return path


def read_manifest(path: str | os.PathLike[str]) -> dict[str, tuple[int, int]]:
    """{file name: (size, crc32)} of a manifest file, every field checked; a malformed
    manifest raises CheckpointError naming it."""
    p = os.fspath(path)
    try:
        with open(p, encoding="utf-8") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: not a ckptio manifest: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise CheckpointError(f'{p}: not a ckptio manifest (no "format": "{_FORMAT}")')
    if doc.get("version") != _VERSION or doc.get("algorithm") != _ALGORITHM:
        raise CheckpointError(
            f"{p}: manifest version {doc.get('version')!r} with algorithm "
            f"{doc.get('algorithm')!r} is not supported (version {_VERSION}, {_ALGORITHM})"
        )
    files = doc.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f'{p}: manifest "files" must be an object')
    out: dict[str, tuple[int, int]] = {}
    for name, entry in files.items():
        try:
            _check_name(name)
            size = entry["size"]
            crc = int(entry[_ALGORITHM], 16)
            if not isinstance(size, int) or size < 0 or not 0 <= crc < 1 << 32:
                raise ValueError("size or digest out of range")
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{p}: manifest entry {name!r} is malformed ({e})") from None
        out[name] = (size, crc)
    return out


def check_manifest(path: str | os.PathLike[str]) -> int:
    """Checks the files a manifest lists against it: `path` is a directory (its
    :data:`MANIFEST_NAME`), a file (its ``<file>.ckptio.manifest.json``) or the manifest
    itself. Returns how many files were checked; raises CheckpointError for a missing
    manifest or file, a size that differs, or a digest that differs (CorruptRecord)."""
    p = os.fspath(path)
    manifest = p if p.endswith(MANIFEST_SUFFIX) or os.path.basename(p) == MANIFEST_NAME else None
    manifest = manifest or manifest_path(p)
    if not os.path.exists(manifest):
        raise CheckpointError(f"{p}: no manifest ({os.path.basename(manifest)} is missing)")
    base = os.path.dirname(manifest)
    listed = read_manifest(manifest)
    for name, (size, stored) in listed.items():
        file = os.path.join(base, name)
        try:
            found_size, found = file_crc32(file)
        except FileNotFoundError:
            raise CheckpointError(f"{manifest}: lists {name}, which is missing") from None
        if found_size != size:
            raise CheckpointError(
                f"{file}: {found_size} bytes where the manifest says {size}; the file is "
                "truncated or was replaced"
            )
        if found != stored:
            raise CorruptRecord(file, name, stored, found, _WHOLE_FILE)
    return len(listed)


def listed_in_manifest(path: str | os.PathLike[str]) -> dict[str, tuple[int, int]] | None:
    """{file name: (size, crc32)} of the manifest of `path` (a directory, or a file with
    its ``<file>.ckptio.manifest.json`` beside it), or None when it has none."""
    manifest = manifest_path(path)
    return read_manifest(manifest) if os.path.exists(manifest) else None


def attach_file_checker(
    source: Any, name: str, listed: Mapping[str, tuple[int, int]] | None
) -> FileChecker | None:
    """Attaches to `source` the checker of the whole-file CRC-32 that `listed` (a manifest)
    gives the file `name`, if it lists it; returns it (call its ``finish`` after the load)."""
    if not listed or name not in listed:
        return None
    size, crc = listed[name]
    checker = FileChecker(source.name, name, size, crc)
    attach(source, checker)
    return checker


def warn_unverified(file: str, why: str) -> None:
    """The :class:`UnverifiedWarning` of a file ``verify`` could not check."""
    warnings.warn(f"{file}: {why}; loaded unchecked", UnverifiedWarning, stacklevel=3)


def _check_name(name: Any) -> None:
    if (
        not isinstance(name, str)
        or not name
        or name.startswith(("/", "\\"))
        or any(part in ("", ".", "..") for part in name.replace("\\", "/").split("/"))
    ):
        raise ValueError(f"manifest file name {name!r} must be a relative path without '..'")


def name_tensors(error: CorruptRecord, obj: Any, storages: Mapping[str, Any]) -> CorruptRecord:
    """`error` naming the tensors of the loaded `obj` that view its record's storage
    (`storages`: the loader's typed storages by key), when they can be found; else as is."""
    import torch

    from ._util import walk_leaves

    key = error.record[len("data/") :] if error.record.startswith("data/") else None
    typed = storages.get(key) if key is not None else None
    if obj is None or typed is None:
        return error
    storage = typed._untyped_storage
    names = [
        ".".join(str(p) for p in path) or "<root>"
        for path, leaf in walk_leaves(obj)
        if isinstance(leaf, torch.Tensor)
        and leaf.device == storage.device
        and leaf.untyped_storage().data_ptr() == storage.data_ptr()
    ]
    if not names:
        return error
    shown = ", ".join(repr(n) for n in names[:5]) + (", ..." if len(names) > 5 else "")
    return error.naming(f"tensor{'s' if len(names) > 1 else ''} {shown}")
