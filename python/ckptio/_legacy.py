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
from typing import Any, NamedTuple

from . import _core
from ._unpickler import needs_dict_memo
from .errors import CheckpointError

__all__ = ["LegacyPickle", "check_legacy"]


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
    scan: _core.PickleScan


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
            scan = _core.scan_pickle(view[pos:], False)
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
