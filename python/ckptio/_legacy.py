"""A structural check of legacy-format files before torch's legacy parser reads them.

The legacy format (torch < 1.6, or ``_use_new_zipfile_serialization=False``) is five pickles
back to back (magic number, protocol version, sys info, the object, the storage keys) and then
each storage as an 8-byte element count and its bytes. torch's parser allocates every storage
by the element count its persistent id declares before reading a byte, so a lying file can
ask for terabytes. This check walks the same structure without running anything: each pickle
passes the opcode pre-scan, the object pickle is replayed by an unpickler whose globals are
inert stubs (it only collects the persistent ids), and the declared storages must fit in the
file. torch then loads the file as before, under the caller's weights_only rules, with a dict
memo for pickles that need one (see _unpickler.needs_dict_memo).
"""

from __future__ import annotations

import io
import pickle
from typing import Any, NamedTuple, Sequence

from . import _core
from ._unpickler import needs_dict_memo
from .errors import CheckpointError

__all__ = ["LegacyPickle", "check_legacy", "check_legacy_records"]

# torch's legacy magic number and protocol version (the first two pickles).
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _Inert:
    """Stands for every global of the file: calling, instantiating or restoring it does
    nothing."""

    full_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _Inert()

    # What SETITEM(S), APPEND(S) and ADDITEMS do to the object they fill.
    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def add(self, value: Any) -> None:
        pass


def _probe_class(base: Any) -> type:
    """`base` (pickle's C Unpickler, or its pure-Python one with a dict memo) with inert
    globals, collecting the storages' declared sizes."""

    class _Probe(base):  # type: ignore[misc,valid-type]
        def __init__(self, file: Any) -> None:
            super().__init__(file, encoding="latin1")
            self.storages: dict[str, int] = {}  # key -> bytes declared
            self.stubs: dict[str, type] = {}

        def find_class(self, module: str, name: str) -> Any:
            full = f"{module}.{name}"
            if full not in self.stubs:
                self.stubs[full] = type(name, (_Inert,), {"full_name": full})
            return self.stubs[full]

        def persistent_load(self, pid: Any) -> Any:
            if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage"):
                _, storage_type, key, _location, numel = pid[:5]
                size = _element_size(getattr(storage_type, "full_name", ""))
                if type(numel) is not int or numel < 0:
                    raise CheckpointError(f"storage {key!r:.40} declares {numel!r:.40} elements")
                self.storages[str(key)] = numel * size
            return _Inert()

    return _Probe


_Probe = _probe_class(pickle.Unpickler)
_DictMemoProbe = _probe_class(pickle._Unpickler)


class LegacyPickle(NamedTuple):
    """One of a legacy file's five pickles: where it lies and what the pre-scan saw."""

    start: int
    end: int
    scan: _core.pickling.PickleScan


# Element sizes of torch's legacy typed storages (reading StorageType.dtype would warn).
_ELEMENT_SIZES = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
    "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1,
    "BoolStorage": 1, "ComplexDoubleStorage": 16, "ComplexFloatStorage": 8,
    "QInt32Storage": 4, "QInt8Storage": 1, "QUInt8Storage": 1, "QUInt4x2Storage": 1,
    "QUInt2x4Storage": 1,
}  # fmt: skip


def _element_size(full_name: str) -> int:
    return _ELEMENT_SIZES.get(full_name.rpartition(".")[2], 1)  # unknown: a lower bound


def check_legacy(data: bytes, name: str) -> list[LegacyPickle]:
    """Raises CheckpointError if `data` is not a well-formed legacy file whose storages fit;
    returns its five pickles (the object is the fourth)."""
    view = memoryview(data)
    pos = 0
    probe_storages: dict[str, int] = {}
    pickles: list[LegacyPickle] = []
    try:
        for index in range(5):
            scan = _core.pickling.scan_pickle(view[pos:], False)
            if not scan.complete:
                raise CheckpointError(
                    f"pickle {index + 1} of the legacy file has an unknown opcode"
                )
            pickles.append(LegacyPickle(pos, pos + scan.end, scan))
            if index == 3:
                probe_class = _DictMemoProbe if needs_dict_memo(scan, scan.end) else _Probe
                probe = probe_class(io.BytesIO(view[pos : pos + scan.end]))
                probe.load()
                probe_storages = probe.storages
            pos += scan.end
    except CheckpointError as e:
        raise CheckpointError(f"{name}: malformed legacy checkpoint: {e}") from None
    except Exception as e:
        raise CheckpointError(
            f"{name}: malformed legacy checkpoint: {type(e).__name__}: {e}"
        ) from None
    declared = sum(probe_storages.values())
    if declared > len(data) - pos:
        raise CheckpointError(
            f"{name}: the legacy checkpoint declares {declared} bytes of storages but holds "
            f"{len(data) - pos} bytes after its pickles"
        )
    return pickles


def check_legacy_records(data: bytes, pickles: Sequence[LegacyPickle], path: str) -> str:
    """Checks what torch's legacy parser will read after the pickles: the magic number and
    protocol version, and, for each key of the storage-keys pickle in order, an 8-byte
    element count equal to the one the object pickle declares for that storage, then that
    many elements. Raises CheckpointError; returns a description of what was checked."""
    magic, protocol, _sys_info, _, keys = (_inert_load(data, p) for p in pickles)
    if magic != _LEGACY_MAGIC:
        raise CheckpointError(f"{path}: the legacy file's magic number is {magic!r:.40}")
    if protocol != _LEGACY_PROTOCOL:
        raise CheckpointError(f"{path}: unsupported legacy protocol version {protocol!r:.40}")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CheckpointError(f"{path}: the storage keys pickle is not a list of strings")
    declared = _legacy_storages(data, pickles[3])
    pos = pickles[4].end
    for key in keys:
        if key not in declared:
            raise CheckpointError(f"{path}: storage record {key!r} is not referenced by the pickle")
        numel, itemsize = declared[key]
        if pos + 8 > len(data):
            raise CheckpointError(f"{path}: the file ends before storage record {key!r}")
        # torch writes the count little-endian whatever the host (serialization.cpp).
        count = int.from_bytes(data[pos : pos + 8], "little", signed=True)
        if count != numel:
            raise CheckpointError(
                f"{path}: storage record {key!r} holds {count} elements; the pickle declares "
                f"{numel}"
            )
        pos += 8 + count * itemsize
        if pos > len(data):
            raise CheckpointError(
                f"{path}: storage record {key!r} is truncated ({pos - len(data)} bytes missing)"
            )
    missing = [k for k in declared if k not in set(keys)]
    if missing:
        raise CheckpointError(
            f"{path}: {len(missing)} storages the pickle references have no record "
            f"({', '.join(repr(k) for k in missing[:5])})"
        )
    if pos != len(data):
        raise CheckpointError(f"{path}: {len(data) - pos} bytes after the last storage record")
    return (
        f"{len(keys)} storage records, each present with the element count the pickle "
        f"declares ({pos - pickles[4].end} bytes, up to the end of the file)"
    )


def _inert_load(data: bytes, p: LegacyPickle) -> Any:
    """One pre-scanned pickle of a legacy file, unpickled with inert globals (nothing runs)."""
    probe = _DictMemoProbe if needs_dict_memo(p.scan, p.scan.end) else _Probe
    return probe(io.BytesIO(memoryview(data)[p.start : p.end])).load()


def _legacy_storages(data: bytes, p: LegacyPickle) -> dict[str, tuple[int, int]]:
    """key -> (elements, element size) of each storage the object pickle `p` references."""
    found: dict[str, tuple[int, int]] = {}
    base = _DictMemoProbe if needs_dict_memo(p.scan, p.scan.end) else _Probe

    class Probe(base):  # type: ignore[misc,valid-type]
        def persistent_load(self, pid: Any) -> Any:
            result = super().persistent_load(pid)  # checks the element count
            if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage"):
                _, storage_type, key, _location, numel = pid[:5]
                name = getattr(storage_type, "full_name", "")
                found[str(key)] = (numel, _element_size(name))
            return result

    Probe(io.BytesIO(memoryview(data)[p.start : p.end])).load()
    return found
