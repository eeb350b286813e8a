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

__all__ = ["Entry", "central_directory_span", "entries", "header_regions"]

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


def header_regions(records: list[Entry], end: int) -> list[tuple[int, int]]:
    """The (start, stop) byte ranges the zip reader reads before any payload: each record's
    local header (30 bytes + its name: the reader takes the extra field's length, not its
    bytes), and the whole span of each metadata record (everything but ``<prefix>/data/*``,
    the storages), which the loader reads next. `end` is where the central directory
    starts: nothing at or past it is asked for here."""
    by_offset = sorted(records, key=lambda e: e.header_offset)
    regions = []
    for i, e in enumerate(by_offset):
        start = e.header_offset
        if not 0 <= start < end:
            continue
        stop = start + _LOCAL_HEADER_SIZE + len(e.name.encode())
        if not _is_storage(e.name):
            # Its payload follows its header and an extra field of unknown length: take
            # everything up to the next record (bounded by the largest extra field).
            limit = by_offset[i + 1].header_offset if i + 1 < len(by_offset) else end
            stop = max(stop, min(limit, stop + _MAX_LOCAL_EXTRA + e.size))
        regions.append((start, min(stop, end)))
    return regions


def _is_storage(name: str) -> bool:
    rel = name.split("/", 1)[1] if "/" in name else name
    return rel.startswith("data/")
