"""The safetensors format: strict header parsing, loading through ckptio's storage loader, and
writing through the same parallel, atomic writer as torch-format saves.

A safetensors file is ``u64 little-endian N`` + ``N`` bytes of UTF-8 JSON (starting with ``{``,
padded with spaces) + the data section. The JSON maps each tensor name to ``{"dtype",
"shape", "data_offsets": [begin, end]}`` (offsets relative to the data section) and may hold
``"__metadata__"``: a str -> str dict. See docs/safetensors.md.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import IO, Any, Mapping

import torch

from . import _core
from ._unpickler import StorageLoader
from ._util import contiguous_strides, json_without_duplicates
from ._writer import tensor_payload, write_placed
from .errors import CheckpointError

__all__ = [
    "DTYPES",
    "Header",
    "TensorEntry",
    "load",
    "looks_like_safetensors",
    "plan",
    "read_header",
    "write",
]

#: Largest header accepted (the limit of the reference implementation).
MAX_HEADER_BYTES = 100_000_000

# The safetensors dtypes: name, the torch dtype (attribute of torch) that safetensors loads it
# as, and the width of one element in bits, in the reference writer's order of precedence
# (its Rust ``Dtype`` enum: the writer sorts tensors by this order, descending, then by name).
# F4 is the one sub-byte dtype torch holds: ``float4_e2m1fn_x2`` packs two F4 values in a byte,
# so a header's F4 shape has a last dimension twice torch's. F6 has no torch dtype.
_DTYPE_ORDER: list[tuple[str, str | None, int]] = [
    ("BOOL", "bool", 8),
    ("F4", "float4_e2m1fn_x2", 4),
    ("F6_E2M3", None, 6),
    ("F6_E3M2", None, 6),
    ("U8", "uint8", 8),
    ("I8", "int8", 8),
    ("F8_E5M2", "float8_e5m2", 8),
    ("F8_E4M3", "float8_e4m3fn", 8),
    ("F8_E8M0", "float8_e8m0fnu", 8),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz", 8),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz", 8),
    ("I16", "int16", 16),
    ("U16", "uint16", 16),
    ("F16", "float16", 16),
    ("BF16", "bfloat16", 16),
    ("I32", "int32", 32),
    ("U32", "uint32", 32),
    ("F32", "float32", 32),
    ("C64", "complex64", 64),
    ("F64", "float64", 64),
    ("I64", "int64", 64),
    ("U64", "uint64", 64),
]
_TORCH_ATTR: dict[str, str | None] = {name: attr for name, attr, _ in _DTYPE_ORDER}
_BITS: dict[str, int] = {name: bits for name, _, bits in _DTYPE_ORDER}
_RANK: dict[str, int] = {name: i for i, (name, _, _) in enumerate(_DTYPE_ORDER)}
#: The packed dtype: its header shape's last dimension is twice torch's.
_PACKED = "F4"


def _build_dtypes(namespace: Any = torch) -> dict[str, torch.dtype]:
    """safetensors dtype name -> torch dtype, for each dtype `namespace` (torch) has."""
    out: dict[str, torch.dtype] = {}
    for name, attr, _ in _DTYPE_ORDER:
        dtype = getattr(namespace, attr, None) if attr is not None else None
        if isinstance(dtype, torch.dtype):
            out[name] = dtype
    return out


#: safetensors dtype name -> torch dtype, for those this torch has.
DTYPES: dict[str, torch.dtype] = _build_dtypes()
_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the header; offsets are absolute file offsets. `shape` is torch's (for
    F4, the header's with the last dimension halved)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Header:
    tensors: list[TensorEntry]  # in data order
    metadata: dict[str, str]
    data_start: int  # 8 + header length
    #: the tensor names in the JSON's order (what safetensors.torch.load_file returns)
    order: list[str]


def looks_like_safetensors(head: bytes, file_size: int) -> bool:
    """True if `head` (the first 9 bytes or more) starts like a safetensors file of this size:
    a plausible header length followed by ``{``."""
    if len(head) < 9:
        return False
    (n,) = struct.unpack_from("<Q", head)
    return 2 <= n <= min(file_size - 8, MAX_HEADER_BYTES) and head[8:9] == b"{"


def read_header(source: Any) -> Header:
    """Parses and validates the header of a safetensors file.

    Checks: the header length fits the file and the 100 MB limit; the JSON is well-formed
    UTF-8, an object, without duplicate keys; ``__metadata__`` maps str to str; every entry has
    a dtype this torch has, a shape of non-negative ints, and offsets ``[begin, end]`` such
    that the entries, sorted by offset, tile the data section exactly (no gap, no overlap,
    nothing left over) and each spans ``prod(shape) * bits / 8`` bytes, a whole number; an F4
    shape's last dimension is even (torch packs two F4 values in a byte). Raises
    CheckpointError naming the file and the problem.
    """
    name, size = source.name, source.size
    if size < 8:
        raise CheckpointError(f"{name}: too short for a safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", source.pread(0, 8))
    if n > MAX_HEADER_BYTES or n > size - 8:
        raise CheckpointError(
            f"{name}: safetensors header length {n} exceeds the file ({size} bytes) or the "
            f"{MAX_HEADER_BYTES}-byte limit; the file is truncated or not safetensors"
        )
    raw = source.pread(8, n)
    if not raw.startswith(b"{"):
        raise CheckpointError(f"{name}: the safetensors header does not start with '{{'")
    try:
        parsed = json_without_duplicates(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{name}: the safetensors header is not valid JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise CheckpointError(f"{name}: the safetensors header is not a JSON object")
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{name}: __metadata__ must map strings to strings")
    data_start = 8 + n
    data_size = size - data_start
    spans: list[tuple[int, int, str, str, torch.dtype, tuple[int, ...]]] = []
    for key, info in parsed.items():
        spans.append((*_check_entry(name, key, info), key, *_entry_type(name, key, info)))
    spans.sort(key=lambda s: (s[0], s[1]))
    expected = 0
    tensors: list[TensorEntry] = []
    for begin, end, key, dtype_name, dtype, shape in spans:
        if begin != expected:
            what = "overlaps the previous one" if begin < expected else "leaves a gap before it"
            raise CheckpointError(
                f"{name}: tensor {key!r} at data offsets [{begin}, {end}] {what} "
                f"(expected it to begin at {expected})"
            )
        numel = 1
        for d in shape:
            numel *= d
        bits = numel * _BITS[dtype_name]
        if bits % 8:
            raise CheckpointError(
                f"{name}: tensor {key!r} of shape {list(shape)} and dtype {dtype_name} holds "
                f"{bits} bits, not a whole number of bytes"
            )
        if bits // 8 != end - begin:
            raise CheckpointError(
                f"{name}: tensor {key!r} of shape {list(shape)} and dtype {dtype_name} needs "
                f"{bits // 8} bytes but its data offsets span {end - begin}"
            )
        if dtype_name == _PACKED:
            shape = _torch_shape(name, key, shape)
        expected = end
        tensors.append(TensorEntry(key, dtype, shape, data_start + begin, end - begin))
    if expected != data_size:
        raise CheckpointError(
            f"{name}: the tensors cover {expected} bytes of a {data_size}-byte data section "
            "(truncated file or inconsistent header)"
        )
    return Header(tensors, metadata, data_start, list(parsed))


def _check_entry(name: str, key: str, info: Any) -> tuple[int, int]:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(
            f"{name}: tensor {key!r} must have exactly 'dtype', 'shape' and 'data_offsets'"
        )
    offsets = info["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CheckpointError(f"{name}: tensor {key!r} has invalid data_offsets {offsets!r:.80}")
    return offsets[0], offsets[1]


def _entry_type(
    name: str, key: str, info: dict[str, Any]
) -> tuple[str, torch.dtype, tuple[int, ...]]:
    """The entry's dtype name, torch dtype and header shape."""
    dtype_name = info["dtype"]
    dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise CheckpointError(
            f"{name}: tensor {key!r} has dtype {dtype_name!r:.40}, {_why_no_dtype(dtype_name)}"
        )
    shape = info["shape"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{name}: tensor {key!r} has an invalid shape {shape!r:.80}")
    return dtype_name, dtype, tuple(shape)


def _why_no_dtype(dtype_name: Any) -> str:
    if not isinstance(dtype_name, str) or dtype_name not in _TORCH_ATTR:
        return f"which is not a safetensors dtype (known: {', '.join(_TORCH_ATTR)})"
    attr = _TORCH_ATTR[dtype_name]
    if attr is None:
        return "for which there is no torch dtype (safetensors cannot load it into torch either)"
    return (
        f"which this torch ({torch.__version__}) cannot represent: it has no torch.{attr} "
        "(a newer torch has it)"
    )


def _torch_shape(name: str, key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """torch's shape of an F4 tensor of header shape `shape`: float4_e2m1fn_x2 holds two
    values per element, so the last dimension is halved (as safetensors loads it)."""
    if not shape or shape[-1] % 2:
        raise CheckpointError(
            f"{name}: tensor {key!r} has dtype F4 and shape {list(shape)}; torch holds F4 as "
            "float4_e2m1fn_x2, two values to a byte, so its last dimension must be even"
        )
    return (*shape[:-1], shape[-1] // 2)


def _header_shape(dtype_name: str, shape: torch.Size) -> list[int]:
    """The header's shape of a torch tensor: for F4, the last dimension doubled."""
    out = list(shape)
    if dtype_name == _PACKED:
        out[-1] *= 2
    return out


# ------------------------------------------------------------------------------------- load
class SafetensorsRecords:
    """The tensors of a safetensors file as records (``data/<i>``: absolute offset, size,
    stored), what the StorageLoader reads storages from, as it reads a torch archive's."""

    def __init__(self, source: Any, header: Header) -> None:  # noqa: D107
        self.source = source
        self.name: str = source.name
        self.records = {f"data/{i}": (t.offset, t.nbytes, 0) for i, t in enumerate(header.tensors)}

    def record(self, name: str) -> Any:
        """Only called for a record the loader cannot use: every one here is stored."""
        raise CheckpointError(f"{self.name}: the file has no tensor record {name!r}")


def load(
    source: Any, map_location: Any, mapping: _core.io.Mapping | None
) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, read in one parallel batch (or viewing `mapping`),
    placed as `map_location` says (saved location: ``cpu``). Keys in file header order."""
    header = read_header(source)
    loader = StorageLoader(SafetensorsRecords(source, header), map_location, mapping)
    try:
        tensors = load_pending(loader, header)
        loader.flush()
    finally:
        loader.join_prefetch()  # a failed load leaves no read running
    return tensors


def load_pending(loader: StorageLoader, header: Header) -> dict[str, torch.Tensor]:
    """The tensors of `header` made by `loader` (over that file's SafetensorsRecords), in
    header order; reads still waiting in ``loader.reads`` (the caller flushes)."""
    tensors: dict[str, torch.Tensor] = {}
    for i, entry in enumerate(header.tensors):
        untyped = loader.storage(str(i), entry.nbytes, "cpu")
        t = torch.empty((0,), dtype=entry.dtype, device=untyped.device)
        tensors[entry.name] = t.set_(untyped, 0, entry.shape, contiguous_strides(entry.shape))
    return {name: tensors[name] for name in header.order}


# ------------------------------------------------------------------------------------- save
@dataclass
class Plan:
    header: bytes  # 8-byte length + padded JSON
    tensors: list[tuple[str, torch.Tensor]]  # in data order, on their devices (kept alive)
    offsets: list[int]  # absolute file offset of each tensor's bytes
    total_size: int


def plan(obj: Any, metadata: Mapping[str, str] | None, clone_shared: bool = False) -> Plan:
    """Checks `obj` (a flat dict of str -> dense contiguous tensor) and lays out the file
    exactly as safetensors' writer does: tensors sorted by dtype (the reference order, widest
    first) then name, packed without padding; F4 (float4_e2m1fn_x2) shapes with the last
    dimension doubled; compact JSON with ``__metadata__`` first; the
    header padded with spaces to a multiple of 8."""
    if not isinstance(obj, Mapping):
        raise TypeError(
            f"format='safetensors' saves a flat dict of str -> torch.Tensor, got "
            f"{type(obj).__name__}"
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(
            "format='safetensors' saves only str -> torch.Tensor entries; these are not: "
            f"{', '.join(repr(k) for k in bad[:10])}{' ...' if len(bad) > 10 else ''} "
            "(save them in metadata as strings, or use format='torch')"
        )
    if "__metadata__" in obj:
        raise ValueError("'__metadata__' is reserved by safetensors and cannot name a tensor")
    if metadata is not None and (
        not isinstance(metadata, Mapping)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise TypeError("metadata must be a dict of str -> str")
    problems: list[str] = []
    for k, v in obj.items():
        if v.layout != torch.strided:
            problems.append(f"{k!r} is {v.layout} (make it dense with .to_dense())")
        elif v.dtype not in _NAMES:
            problems.append(f"{k!r} has dtype {v.dtype}, which safetensors cannot store")
        elif v.dim() == 0 and _NAMES[v.dtype] == _PACKED:
            problems.append(
                f"{k!r} is a 0-d {v.dtype} tensor: its one byte holds two F4 values, which a "
                "safetensors shape cannot describe (give it a shape, e.g. .reshape(1))"
            )
        elif v.device.type == "meta":
            problems.append(f"{k!r} is on the meta device and has no data")
        elif not v.is_contiguous():
            problems.append(f"{k!r} is not contiguous (call .contiguous() on it)")
    if problems:
        raise ValueError("cannot save as safetensors: " + "; ".join(problems))
    tensors = {k: v.detach() for k, v in obj.items()}
    if not clone_shared:
        groups = _shared_groups(tensors)
        if groups:
            listed = "; ".join(", ".join(repr(k) for k in g) for g in groups)
            raise ValueError(
                f"these tensors share memory: {listed}. safetensors stores each tensor on its "
                "own, so their sharing would be lost on load. Drop the duplicate keys (and "
                "re-tie them after loading), or pass clone_shared=True to store each one as "
                "an independent copy"
            )
    order = sorted(tensors, key=lambda k: (-_RANK[_NAMES[tensors[k].dtype]], k))
    entries: dict[str, Any] = {}
    if metadata:
        entries["__metadata__"] = dict(metadata)
    position = 0
    data: list[tuple[str, torch.Tensor]] = []
    for k in order:
        t = tensors[k]
        nbytes = t.numel() * t.element_size()
        dtype_name = _NAMES[t.dtype]
        entries[k] = {
            "dtype": dtype_name,
            "shape": _header_shape(dtype_name, t.shape),
            "data_offsets": [position, position + nbytes],
        }
        data.append((k, t))
        position += nbytes
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    header = struct.pack("<Q", len(text)) + text
    offsets = []
    at = len(header)
    for _k, t in data:
        offsets.append(at)
        at += t.numel() * t.element_size()
    return Plan(header, data, offsets, at)


def _shared_groups(tensors: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Names of tensors whose bytes overlap in one storage (as safetensors' check)."""
    by_storage: dict[tuple[Any, int], list[tuple[int, int, str]]] = {}
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if nbytes == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() == 0:
            continue
        start = t.data_ptr()
        by_storage.setdefault((t.device, storage.data_ptr()), []).append((start, start + nbytes, k))
    groups: list[list[str]] = []
    for spans in by_storage.values():
        if len(spans) < 2:
            continue
        spans.sort()
        current = [spans[0][2]]
        end = spans[0][1]
        for begin, stop, k in spans[1:]:
            if begin < end:
                current.append(k)
                end = max(end, stop)
            else:
                if len(current) > 1:
                    groups.append(sorted(current))
                current, end = [k], stop
        if len(current) > 1:
            groups.append(sorted(current))
    return groups


def write(target: _core.io.File | IO[bytes], p: Plan, *, file_crc32: bool = False) -> int | None:
    """Writes a planned file through the save pipeline: parallel pwrite into a _core.io.File
    (one batch, GIL released; CUDA tensors through the pinned ring), sequential writes into a
    file object. With `file_crc32`, returns the CRC-32 of the whole file, computed from the
    buffers as they are written (_writer.write_placed); else None."""
    placed: list[tuple[int, Any]] = [(0, p.header)]
    copiers: dict[torch.device, Any] = {}
    held = []
    for (_k, t), offset in zip(p.tensors, p.offsets, strict=True):
        payload, kept = tensor_payload(t, copiers)
        held.append(kept)
        placed.append((offset, payload))
    crc = write_placed(target, placed, p.total_size, file_crc32=file_crc32)
    del held  # alive until written
    return crc
