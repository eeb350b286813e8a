"""Where the bytes the zip reader needs lie in a remote torch archive, found before any of
them is fetched but the tail: the end of central directory record (and its zip64 records),
the central directory, and for each record its local header, plus the whole of every
metadata record (``data.pkl``, ``version``, ``byteorder``...).

This is a locator, not a validator: it reads only the fields that say where to look, and on
anything it does not understand it asks for less, never for bytes outside the object. The C++
reader (``_core.zip.read_zip_directory``) then validates the container over the fetched
bytes as it validates a local file; a byte it needs that was not fetched reads as zero and
fails its checks (CheckpointError), never a silent wrong offset.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = [
    "Entry",
    "Prediction",
    "central_directory_span",
    "data_offset",
    "entries",
    "header_regions",
    "is_storage",
    "predict_storage_headers",
    "storage_alignment",
]

_EOCD = b"PK\x05\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_EOCD = b"PK\x06\x06"
_CENTRAL = b"PK\x01\x02"
_EOCD_SIZE = 22
_MAX_COMMENT = 0xFFFF
_LOCAL_HEADER_SIZE = 30
_MAX_LOCAL_EXTRA = 0xFFFF


class Entry(NamedTuple):
    name: str
    header_offset: int
    size: int  # compressed size: the payload's bytes


def central_directory_span(tail: bytes, tail_start: int) -> tuple[int, int]:
    """(offset, size) of the central directory, from `tail`, the object's last bytes
    (starting at object offset `tail_start`); (0, 0) when no end record is found."""
    at = tail.rfind(_EOCD, max(0, len(tail) - _EOCD_SIZE - _MAX_COMMENT))
    if at < 0 or at + _EOCD_SIZE > len(tail):
        return 0, 0
    cd_size, cd_offset = struct.unpack_from("<II", tail, at + 12)
    (count,) = struct.unpack_from("<H", tail, at + 10)
    if cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF or count == 0xFFFF:
        loc = at - 20
        if loc >= 0 and tail[loc : loc + 4] == _ZIP64_LOCATOR:
            (z64_offset,) = struct.unpack_from("<Q", tail, loc + 8)
            rel = z64_offset - tail_start
            if 0 <= rel and rel + 56 <= len(tail) and tail[rel : rel + 4] == _ZIP64_EOCD:
                cd_size, cd_offset = struct.unpack_from("<QQ", tail, rel + 40)
    return cd_offset, cd_size


def entries(directory: bytes) -> list[Entry]:
    """The records the central directory `directory` lists (as far as it parses)."""
    out: list[Entry] = []
    at = 0
    while at + 46 <= len(directory) and directory[at : at + 4] == _CENTRAL:
        size, _, n, m, k = struct.unpack_from("<IIHHH", directory, at + 20)
        (offset,) = struct.unpack_from("<I", directory, at + 42)
        name_raw = directory[at + 46 : at + 46 + n]
        extra = directory[at + 46 + n : at + 46 + n + m]
        (usize,) = struct.unpack_from("<I", directory, at + 24)
        if 0xFFFFFFFF in (size, usize, offset):
            size, offset = _zip64_fields(extra, usize, size, offset)
        out.append(Entry(name_raw.decode("utf-8", "replace"), offset, size))
        at += 46 + n + m + k
    return out


def _zip64_fields(extra: bytes, usize: int, size: int, offset: int) -> tuple[int, int]:
    """(compressed size, local header offset) with the zip64 extra field's values."""
    at = 0
    while at + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, at)
        body = extra[at + 4 : at + 4 + length]
        if tag == 0x0001:
            values = [v for (v,) in struct.iter_unpack("<Q", body[: len(body) // 8 * 8])]
            i = 0
            if usize == 0xFFFFFFFF and i < len(values):
                i += 1
            if size == 0xFFFFFFFF and i < len(values):
                size, i = values[i], i + 1
            if offset == 0xFFFFFFFF and i < len(values):
                offset = values[i]
            break
        at += 4 + length
    return size, offset


def header_regions(
    records: list[Entry], end: int, skip: frozenset[str] = frozenset()
) -> list[tuple[int, int]]:
    """The (start, stop) byte ranges the zip reader reads before any payload: each record's
    local header (30 bytes + its name: the reader takes the extra field's length, not its
    bytes), and the whole span of each metadata record (everything but ``<prefix>/data/*``,
    the storages), which the loader reads next. `end` is where the central directory
    starts: nothing at or past it is asked for here. Records named in `skip` (whose headers
    are predicted) are left out."""
    by_offset = sorted(records, key=lambda e: e.header_offset)
    regions = []
    for i, e in enumerate(by_offset):
        start = e.header_offset
        if not 0 <= start < end or e.name in skip:
            continue
        stop = start + _LOCAL_HEADER_SIZE + len(e.name.encode())
        if not is_storage(e.name):
            # Its payload follows its header and an extra field of unknown length: take
            # everything up to the next record (bounded by the largest extra field).
            limit = by_offset[i + 1].header_offset if i + 1 < len(by_offset) else end
            stop = max(stop, min(limit, stop + _MAX_LOCAL_EXTRA + e.size))
        regions.append((start, min(stop, end)))
    return regions


def data_offset(header: bytes | bytearray | memoryview, header_offset: int) -> int | None:
    """Where the payload of the record whose local header is `header` (at least its first
    30 bytes, read at `header_offset`) starts; None when `header` is not a local header."""
    if len(header) < _LOCAL_HEADER_SIZE or bytes(header[:4]) != b"PK\x03\x04":
        return None
    name_len, extra_len = struct.unpack_from("<HH", header, 26)
    return header_offset + _LOCAL_HEADER_SIZE + name_len + extra_len


def is_storage(name: str) -> bool:
    """Whether record `name` is a storage (``<prefix>/data/*``), not metadata."""
    rel = name.split("/", 1)[1] if "/" in name else name
    return rel.startswith("data/")


class Prediction(NamedTuple):
    """The local header a storage record is predicted to have: at `header_offset`, the
    `header` bytes the zip reader reads (signature, name and extra lengths, name; every other
    field zero), followed by `extra` bytes of extra field, then the payload."""

    header_offset: int
    header: bytes
    extra: int

    @property
    def data_offset(self) -> int:
        return self.header_offset + len(self.header) + self.extra

    def matches(self, real: bytes | bytearray | memoryview) -> bool:
        """Whether `real`, the object's bytes at `header_offset`, has the fields the zip
        reader checks as predicted (signature, name length and name, extra length): then the
        reader finds the payload where the prediction put it."""
        h = self.header
        return len(real) >= len(h) and (
            real[:4] == h[:4] and real[26:30] == h[26:30] and real[30 : len(h)] == h[30:]
        )


#: the alignment torch's writer gives every record unless told otherwise, and ckptio its
#: metadata records
_DEFAULT_ALIGNMENT = 64


def predict_storage_headers(
    records: list[Entry], end: int, storage_alignment: int | None
) -> dict[str, Prediction] | None:
    """The local headers of the storage records (``<prefix>/data/*``) of an archive laid out
    as torch's writer lays one out (and ckptio's, byte for byte: ``_core.zip.plan_archive``),
    or None for any other layout. Metadata records are aligned to 64 bytes (ckptio) or as
    the storages (torch); storages to `storage_alignment` (the ``.storage_alignment``
    record's value) or 64. A candidate layout is taken only if it puts every record's
    header at the offset the central directory gives and the central directory at `end`:
    each padding is then the writer's. The reads of the payloads check each prediction
    (:meth:`Prediction.matches`) before a load returns."""
    from .. import _core

    by_offset = sorted(records, key=lambda e: e.header_offset)
    if not by_offset or by_offset[0].header_offset != 0 or "/" not in by_offset[0].name:
        return None
    prefix = by_offset[0].name.split("/", 1)[0]
    if not all(e.name.startswith(prefix + "/") for e in by_offset):
        return None
    storage = [is_storage(e.name) for e in by_offset]
    if not any(storage):
        return None
    names = [e.name[len(prefix) + 1 :] for e in by_offset]
    actual = [e.header_offset for e in by_offset]
    alignments = [a for a in (storage_alignment, _DEFAULT_ALIGNMENT) if a]
    candidates = [(m, a) for a in alignments for m in (_DEFAULT_ALIGNMENT, a)]
    for meta, data in dict.fromkeys(candidates):
        specs = [
            (name, e.size, data if stored else meta)
            for name, e, stored in zip(names, by_offset, storage, strict=True)
        ]
        try:
            layout = _core.zip.plan_archive(prefix, specs)
        except Exception:  # a name or alignment the writer refuses: not its layout
            continue
        if layout.central_directory_offset != end or layout.header_offsets != actual:
            continue
        out: dict[str, Prediction] = {}
        for e, stored, data_offset in zip(by_offset, storage, layout.data_offsets, strict=True):
            if not stored:
                continue
            name = e.name.encode()
            extra = data_offset - e.header_offset - _LOCAL_HEADER_SIZE - len(name)
            if not 0 <= extra <= _MAX_LOCAL_EXTRA:
                return None
            header = struct.pack("<4s22xHH", b"PK\x03\x04", len(name), extra) + name
            out[e.name] = Prediction(e.header_offset, header, extra)
        return out
    return None


def storage_alignment(raw: bytes | None) -> int | None:
    """The value of a ``.storage_alignment`` record's payload, when it is one (a power of
    two up to 64 KiB)."""
    try:
        value = int((raw or b"").strip() or b"0")
    except ValueError:
        return None
    return value if 0 < value <= 1 << 16 and value & (value - 1) == 0 else None
