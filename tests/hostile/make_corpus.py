"""Generates the hostile-file corpus: crafted checkpoints that each lie in one way.

Nothing binary is committed: every case is built here from a valid checkpoint or from a
hand-assembled zip and pickle, at test time. Each case says what loading it must raise (the
exception class, its errno for OSError, and a fragment of the message).

Usage: python -m tests.hostile.make_corpus DIR   (writes the files and an index.json)
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import pickle
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

import torch

ARCHIVE = "archive"


@dataclasses.dataclass
class Case:
    name: str
    # "CheckpointError", "UnsafeGlobalError", an OSError subclass name, or "ok": the file is
    # valid however it looks (it loads, with bounded memory: the corpus loads under a limit)
    expected: str
    fragment: str  # a piece of the message (matched case-insensitively); "" for "ok"
    data: bytes | None = None  # the file's bytes; None for the special kinds below
    kind: str = "file"  # file | directory | missing | unreadable
    load_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    errno: int | None = None
    marker: bool = False  # the payload would create <file>.marker: it must not exist after


# ------------------------------------------------------------------------------ zip writing
@dataclasses.dataclass
class Entry:
    name: str
    payload: bytes
    header_offset: int = 0
    crc: int = 0


def build_zip(
    records: dict[str, bytes], *, prefix: str = ARCHIVE + "/"
) -> tuple[bytes, list[Entry]]:
    """A stored zip (no zip64) of the records, and where each landed."""
    out = bytearray()
    entries = []
    for name, payload in records.items():
        full = (prefix + name).encode()
        e = Entry(prefix + name, payload, len(out), zlib.crc32(payload))
        out += struct.pack(
            "<IHHHHHIIIHH",
            0x04034B50,
            20,
            0,
            0,
            0,
            0,
            e.crc,
            len(payload),
            len(payload),
            len(full),
            0,
        )
        out += full + payload
        entries.append(e)
    return bytes(out) + central_directory(entries, len(out)), entries


def central_directory(entries: list[Entry], cd_offset: int, *, count: int | None = None) -> bytes:
    cd = bytearray()
    for e in entries:
        full = e.name.encode()
        cd += struct.pack(
            "<IHHHHHHIIIHHHHHII",
            0x02014B50,
            20,
            20,
            0,
            0,
            0,
            0,
            e.crc,
            len(e.payload),
            len(e.payload),
            len(full),
            0,
            0,
            0,
            0,
            0,
            e.header_offset,
        )
        cd += full
    n = len(entries) if count is None else count
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(cd), cd_offset, 0)
    return bytes(cd) + eocd


# --------------------------------------------------------------------------- pickle writing
class StorageRef:
    def __init__(self, key: str, numel: int, storage_type: Any = torch.FloatStorage) -> None:
        self.key, self.numel, self.storage_type = key, numel, storage_type


class TensorLie:
    """Pickles as torch pickles a tensor, with whatever geometry it is given."""

    def __init__(self, storage: StorageRef, offset: Any, size: Any, stride: Any) -> None:
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self) -> Any:
        return (torch._utils._rebuild_tensor_v2, self.args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, StorageRef):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def checkpoint(pkl: bytes, storages: dict[str, bytes] | None = None) -> bytes:
    records = {"data.pkl": pkl, "byteorder": b"little"}
    records.update({f"data/{k}": v for k, v in (storages or {}).items()})
    records["version"] = b"3\n"
    return build_zip(records)[0]


def tensor_file(
    offset: Any,
    size: Any,
    stride: Any,
    *,
    numel: int = 16,
    record: int = 64,
    key: str = "0",
    storage_type: Any = torch.FloatStorage,
) -> bytes:
    pkl = dumps({"w": TensorLie(StorageRef("0", numel, storage_type), offset, size, stride)})
    return checkpoint(pkl, {key: bytes(record)})


# ------------------------------------------------------------------------------ the cases
def _valid() -> bytes:
    import ckptio

    buf = io.BytesIO()
    ckptio.save({"a": torch.arange(3000, dtype=torch.float32), "meta": {"epoch": 3}}, buf)
    return buf.getvalue()


def _regions(data: bytes) -> dict[str, int]:
    """Offsets inside each region of a ckptio-written file."""
    pkl = data.index(b"data.pkl") + len(b"data.pkl")
    return {
        "local-header": 17,
        "pickle": data.index(b"\x80\x02", pkl) + 20,
        "payload": data.index(bytes(4) + struct.pack("<f", 1.0)) + 100,
        "central-directory": data.index(b"PK\x01\x02") + 30,
        "eocd": data.rindex(b"PK\x05\x06") + 12,
    }


def _patch(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value) :]


def _central_entries(data: bytes) -> dict[str, int]:
    """name -> offset of its central directory header."""
    out = {}
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        nlen = struct.unpack_from("<H", data, at + 28)[0]
        out[data[at + 46 : at + 46 + nlen].decode(errors="replace")] = at
        at = data.find(b"PK\x01\x02", at + 46)
    return out


def container_cases() -> list[Case]:
    good_pkl = dumps({"w": TensorLie(StorageRef("0", 4), 0, (4,), (1,))})
    records = {"data.pkl": good_pkl, "data/0": bytes(16), "version": b"3\n"}
    plain, entries = build_zip(records)
    cds = _central_entries(plain)
    cd_start = min(cds.values())
    data0 = cds[f"{ARCHIVE}/data/0"]
    cases = [
        Case(
            "offset-beyond-eof",
            "CheckpointError",
            "local header at offset",
            _patch(plain, data0 + 42, struct.pack("<I", len(plain) + 1000)),
        ),
        Case(
            "size-beyond-eof",
            "CheckpointError",
            "extends past the central directory",
            _patch(
                _patch(plain, data0 + 20, struct.pack("<II", 1 << 30, 1 << 30)),
                entries[1].header_offset + 18,
                struct.pack("<II", 1 << 30, 1 << 30),
            ),
        ),
        Case(
            "record-points-into-central-directory",
            "CheckpointError",
            "past the start of the central directory",
            _patch(plain, data0 + 42, struct.pack("<I", cd_start)),
        ),
        Case(
            "overlapping-records",
            "CheckpointError",
            "names a different record",
            _patch(plain, data0 + 42, struct.pack("<I", entries[0].header_offset)),
        ),
        Case(
            "eocd-count-disagrees",
            "CheckpointError",
            "declares 7 entries",
            plain[:cd_start] + central_directory(entries, cd_start, count=7),
        ),
    ]
    # Names: one escaping the archive prefix, one under another prefix.
    for label, name, fragment in (
        ("name-escapes-prefix", f"{ARCHIVE}/../evil", "contains a '..' component"),
        ("name-absolute", "/etc/passwd", "is an absolute path"),
        ("name-other-prefix", "other/data/0", "lies outside the archive prefix"),
    ):
        body, ents = build_zip(records)
        ents[1].name = name
        bad = bytearray()
        for e in ents:
            full = e.name.encode()
            e.header_offset = len(bad)
            bad += (
                struct.pack(
                    "<IHHHHHIIIHH",
                    0x04034B50,
                    20,
                    0,
                    0,
                    0,
                    0,
                    e.crc,
                    len(e.payload),
                    len(e.payload),
                    len(full),
                    0,
                )
                + full
                + e.payload
            )
        cases.append(
            Case(label, "CheckpointError", fragment, bytes(bad) + central_directory(ents, len(bad)))
        )
    # zip64: a ckptio-written file's zip64 end record disagreeing with the plain one.
    valid = _valid()
    z64 = valid.rindex(b"PK\x06\x06")
    cases.append(
        Case(
            "zip64-count-disagrees",
            "CheckpointError",
            "disagrees with the zip64",
            _patch(valid, z64 + 24, struct.pack("<QQ", 999, 999)),
        )
    )
    cases.append(
        Case(
            "zip64-cd-offset-beyond-eof",
            "CheckpointError",
            "disagrees with the zip64",
            _patch(valid, z64 + 48, struct.pack("<Q", 1 << 50)),
        )
    )
    cases.append(
        Case(
            "zip64-locator-beyond-eof",
            "CheckpointError",
            "does not leave room",
            _patch(valid, valid.rindex(b"PK\x06\x07") + 8, struct.pack("<Q", 1 << 60)),
        )
    )
    return cases


def truncation_cases() -> list[Case]:
    valid = _valid()
    out = []
    for region, cut in _regions(valid).items():
        for mode in ("eager", "mmap"):
            # A cut anywhere loses the end of central directory record with the tail.
            out.append(
                Case(
                    f"truncated-in-{region}-{mode}",
                    "CheckpointError",
                    "not a zip archive",
                    valid[:cut],
                    load_kwargs={"mmap": mode == "mmap"},
                )
            )
    out.append(Case("empty-file", "CheckpointError", "not a torch checkpoint", b""))
    # Legacy-format files (pickles back to back, then raw storages): ckptio checks their
    # structure (_legacy.check_legacy), then torch's parser reads them; its errors come out as
    # CheckpointError. The memo bomb as a whole file was found by make fuzz-py: a valid pickle
    # (a dict memo holds it) but no legacy file, its second pickle is missing.
    legacy = io.BytesIO()
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    raw = legacy.getvalue()
    magic = raw.index(b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19")  # the pickled magic number
    numel = raw.index(b"K\x03Nt")  # BININT1 3: the element count; None; TUPLE
    out += [
        Case("legacy-memo-bomb", "CheckpointError", "malformed legacy checkpoint: pickle is "
             "truncated", b"\x80\x02}r\xff\xff\xff\x7f."),
        Case("legacy-truncated", "CheckpointError", "malformed legacy checkpoint",
             raw[: len(raw) // 2]),
        Case("legacy-truncated-payload", "CheckpointError", "could not read the file",
             raw[:-5]),
        Case("legacy-bad-magic", "CheckpointError", "Invalid magic number",
             raw[: magic + 3] + b"\x00" + raw[magic + 4 :]),
        Case("legacy-storage-bomb", "CheckpointError", "declares 1073741824 bytes",
             raw[:numel] + b"J\x00\x00\x00\x10" + raw[numel + 2 :]),
    ]  # fmt: skip
    return out


def os_cases() -> list[Case]:
    import errno

    return [
        Case(
            "directory", "IsADirectoryError", "directory.pt", kind="directory", errno=errno.EISDIR
        ),
        Case("missing", "FileNotFoundError", "missing.pt", kind="missing", errno=errno.ENOENT),
        Case(
            "unreadable",
            "PermissionError",
            "unreadable.pt",
            _valid(),
            kind="unreadable",
            errno=errno.EACCES,
        ),
    ]


def _raw_pickle_file(pkl: bytes) -> bytes:
    return checkpoint(pkl)


def _global_pickle(module: str, name: str, args: tuple[Any, ...]) -> bytes:
    body = b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    return b"\x80\x02" + body + pickle.dumps(args, protocol=2)[2:-1] + b"R."


def pickle_cases(marker_dir: Path) -> list[Case]:
    f64 = torch.DoubleStorage
    cases = [
        Case(
            "numel-times-elsize-overflows",
            "CheckpointError",
            "needs",
            tensor_file(0, (2**61,), (1,), numel=2**61, storage_type=f64),
        ),
        Case("numel-enormous", "CheckpointError", "needs", tensor_file(0, (4,), (1,), numel=2**62)),
        Case(
            "numel-negative",
            "CheckpointError",
            "invalid element count",
            tensor_file(0, (4,), (1,), numel=-4),
        ),
        Case(
            "shape-negative",
            "CheckpointError",
            "invalid tensor geometry",
            tensor_file(0, (-4,), (1,)),
        ),
        Case(
            "shape-enormous", "CheckpointError", "needs", tensor_file(0, (2**40, 2**40), (2**40, 1))
        ),
        Case(
            "stride-negative",
            "CheckpointError",
            "invalid tensor geometry",
            tensor_file(0, (4,), (-1,)),
        ),
        Case("stride-enormous", "CheckpointError", "needs", tensor_file(0, (4,), (2**62,))),
        Case(
            "shape-not-ints",
            "CheckpointError",
            "invalid tensor geometry",
            tensor_file(0, ("4",), (1,)),
        ),
        Case(
            "rank-mismatch",
            "CheckpointError",
            "invalid tensor geometry",
            tensor_file(0, (4, 4), (1,)),
        ),
        Case("storage-offset-outside", "CheckpointError", "needs", tensor_file(1000, (4,), (1,))),
        Case(
            "storage-offset-negative",
            "CheckpointError",
            "invalid tensor geometry",
            tensor_file(-8, (4,), (1,)),
        ),
        Case(
            "storage-key-without-record",
            "CheckpointError",
            "data/0",
            tensor_file(0, (4,), (1,), key="7"),
        ),
        Case(
            "record-too-small", "CheckpointError", "needs 64", tensor_file(0, (16,), (1,), record=8)
        ),
        # A memo index far past the pickle's size is valid (CPython accepts any): CPython's C
        # unpickler would size a 32 GiB array by it, ckptio unpickles it with a dict memo.
        Case("memo-bomb", "ok", "", _raw_pickle_file(b"\x80\x02}r\xff\xff\xff\x7f.")),
        Case(
            "memo-bomb-full-load",
            "ok",
            "",
            _raw_pickle_file(b"\x80\x02}r\xff\xff\xff\x7f."),
            load_kwargs={"weights_only": False},
        ),
        Case(
            "memo-bomb-text-put-full-load",
            "ok",
            "",
            _raw_pickle_file(b"(lp9223372036854775807\n."),
            load_kwargs={"weights_only": False},
        ),
        Case(
            "memo-get-unstored",
            "CheckpointError",
            "never stored",
            _raw_pickle_file(b"\x80\x02}j\xff\xff\xff\x7f."),
        ),
        Case(
            "binunicode-4gib",
            "CheckpointError",
            "BINUNICODE at offset",
            _raw_pickle_file(b"\x80\x02X\xf0\xff\xff\xffabc."),
        ),
        Case(
            "binbytes8-enormous-full-load",
            "CheckpointError",
            "BINBYTES8 at offset",
            _raw_pickle_file(b"\x80\x04\x8e" + struct.pack("<Q", 1 << 62) + b"."),
            load_kwargs={"weights_only": False},
        ),
        Case(
            "frame-enormous-full-load",
            "CheckpointError",
            "FRAME at offset",
            _raw_pickle_file(b"\x80\x04\x95" + struct.pack("<Q", 1 << 40) + b"N."),
            load_kwargs={"weights_only": False},
        ),
        # Any nesting is valid: CPython's unpickler is iterative, and so is ckptio's load path.
        Case("deep-tuples", "ok", "", _raw_pickle_file(b"\x80\x02)" + b"\x85" * 100_000 + b".")),
        Case(
            "deep-tuples-full-load",
            "ok",
            "",
            _raw_pickle_file(b"\x80\x02)" + b"\x85" * 100_000 + b"."),
            load_kwargs={"weights_only": False},
        ),
        Case(
            "deep-lists",
            "ok",
            "",
            _raw_pickle_file(b"\x80\x02" + b"]" * 50_000 + b"a" * 49_999 + b"."),
        ),
        Case("deep-marks", "ok", "", _raw_pickle_file(b"\x80\x02" + b"(" * 100_000 + b"N.")),
        Case(
            "pickle-without-stop",
            "CheckpointError",
            "without a STOP",
            _raw_pickle_file(b"\x80\x02}q\x00"),
        ),
        Case(
            "stack-underflow", "CheckpointError", "stack underflow", _raw_pickle_file(b"\x80\x02R.")
        ),
    ]
    # Opcodes torch's weights-only unpickler does not support.
    for op, label in (
        (b"i", "INST"),
        (b"o", "OBJ"),
        (b"\x82\x01", "EXT1"),
        (b"\x93", "STACK_GLOBAL"),
        (b"Pfoo\n", "PERSID"),
        (b"\x95" + bytes(8), "FRAME"),
        (b"\xff", "unknown"),
    ):
        cases.append(
            Case(
                f"opcode-{label}",
                "CheckpointError",
                "unknown opcode 0xff" if label == "unknown" else f"{label} is not supported",
                _raw_pickle_file(b"\x80\x02N" + op + b"."),
            )
        )
    # Globals outside the allowlist whose call would create a marker file.
    for label, module, name, args in (
        ("os-system", "os", "system", ("touch {m}",)),
        ("posix-system", "posix", "system", ("touch {m}",)),
        ("subprocess", "subprocess", "call", (["touch", "{m}"],)),
        ("builtins-exec", "builtins", "exec", ("open('{m}', 'w').close()",)),
        ("builtins-eval", "builtins", "eval", ("open('{m}', 'w').close()",)),
        ("pathlib-touch", "pathlib", "Path.touch", ()),
        ("torch-save", "torch", "save", ({}, "{m}")),
    ):
        marker = str(marker_dir / f"{label}.marker")
        filled = tuple(
            [a.format(m=marker) if isinstance(a, str) else a for a in x]
            if isinstance(x, list)
            else x.format(m=marker)
            if isinstance(x, str)
            else x
            for x in args
        )
        pkl = _global_pickle(module, name, filled)
        cases.append(
            Case(
                f"global-{label}",
                "UnsafeGlobalError",
                f"{module}.{name}",
                _raw_pickle_file(pkl),
                marker=True,
            )
        )
    # The same payload hidden inside an otherwise valid state dict.
    marker = str(marker_dir / "nested.marker")
    inner = _global_pickle("os", "system", (f"touch {marker}",))[2:-1]
    pkl = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01" + inner + b"u."
    cases.append(
        Case(
            "global-nested-in-dict",
            "UnsafeGlobalError",
            "os.system",
            _raw_pickle_file(pkl),
            marker=True,
        )
    )
    return cases


def all_cases(marker_dir: Path) -> list[Case]:
    return truncation_cases() + os_cases() + container_cases() + pickle_cases(marker_dir)


def write_corpus(out: Path) -> list[dict[str, Any]]:
    """Writes every case under `out`; returns the index (one dict per case, path included)."""
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for case in all_cases(out):
        path = out / f"{case.name}.pt"
        if case.kind == "directory":
            path.mkdir(exist_ok=True)
        elif case.kind != "missing":
            assert case.data is not None
            path.write_bytes(case.data)
            if case.kind == "unreadable":
                path.chmod(0)
        entry = dataclasses.asdict(case)
        del entry["data"]
        entry["path"] = str(path)
        index.append(entry)
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return index


if __name__ == "__main__":
    write_corpus(Path(sys.argv[1]))
