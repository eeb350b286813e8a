"""``load_into``: read a checkpoint straight into tensors that already exist.

A training loop that reloads weights, or a server that swaps models of one shape, already has
memory for every tensor. ``load_into`` parses ``data.pkl`` without materialising a single
storage: each tensor of the file becomes a ``TensorSpec`` (where its bytes are, its dtype and
geometry), through the same weights-only ``find_class``, pre-scan and record and geometry
checks as :func:`ckptio.load`; a pickle that needs tensor objects is parsed over ``meta``
placeholders instead. It maps each tensor of the target to the bytes of its counterpart in
the file, and reads them all in one parallel batch straight into the target's memory: no
allocation, no page faults on fresh memory, no copy.

The common case of the parse and of the match is C (csrc/bindings/register_specs.cpp): the
per-tensor calls of the unpickler, and ``_core.pickling.plan_direct_reads``, which turns each
pair of contiguous CPU tensors of the same dtype and shape into a (file offset, size,
address) read. It leaves every other pair to :func:`_match` here.

The read step is one function over those reads and a list of :class:`ReadItem` (file offset,
byte count, destination tensor), :func:`read_items`. Contiguous CPU destinations are read
into directly; CUDA destinations stream through the pinned staging ring; other
non-contiguous destinations are read into a host temporary and copied with ``copy_``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import IO, Any, Mapping, NamedTuple, Union

import torch

from . import _core, _directory, _remote, _safetensors
from ._archive import ArchiveReader
from ._files import open_source
from ._reads import ReadBatch
from ._unpickler import NeedsTensors, TensorSpec, unpickle_placeholders, unpickle_specs
from ._util import contiguous_strides, gc_paused, walk_leaves
from .errors import CheckpointError
from .settings import get_options, options

__all__ = ["IncompatibleKeys", "ReadItem", "load_into", "read_items"]

FileLike = Union[str, os.PathLike, IO[bytes]]
Path = tuple[Any, ...]


class IncompatibleKeys(NamedTuple):
    """What :func:`load_into` did not fill (as ``nn.Module.load_state_dict`` returns)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


@dataclass(slots=True)
class ReadItem:
    """Read `nbytes` bytes at `file_offset` into `dest` (whose bytes are exactly `nbytes`).

    `then`, when set, is called after the read (used to scatter a strided source)."""

    file_offset: int
    nbytes: int
    dest: torch.Tensor
    then: Any = field(default=None, repr=False)


def _flatten(obj: Any, leaf: type) -> dict[Path, Any]:
    """{path: value} for every `leaf` (a tensor, or a TensorSpec) in nested dicts, lists and
    tuples (in order)."""
    out: dict[Path, Any] = {}
    if isinstance(obj, dict):  # the common case, a flat state dict: no recursion
        nested = False
        for k, v in obj.items():
            if isinstance(v, leaf):
                out[(k,)] = v
            elif isinstance(v, (dict, list, tuple)):
                nested = True
                break
        if not nested:
            return out
        out.clear()
    return {path: v for path, v in walk_leaves(obj, leaf=leaf) if isinstance(v, leaf)}


def _name(path: Path) -> str:
    return ".".join(str(p) for p in path)


def _open(f: FileLike) -> tuple[Any, Any]:
    """(source, file to close or None) for a path or a binary file object (read as
    :func:`ckptio.load` reads it, see _files.py)."""
    if isinstance(f, (str, bytes, os.PathLike)):
        file = _core.io.File.open(os.fsdecode(f), _core.io.FileMode.READ)
        return file, file
    source, adopted, _ = open_source(f)
    return source, adopted


def _item_for(src: TensorSpec, dest: torch.Tensor, numel: int) -> ReadItem:
    """The read that fills `dest` from the file's tensor `src` (`numel` elements)."""
    itemsize = src.dtype.itemsize
    start = src.data_offset + src.storage_offset * itemsize
    if _is_contiguous(src.size, src.stride):
        return ReadItem(start, numel * itemsize, dest)
    # A strided view in the file: read the span it covers, then copy it out strided.
    span = 1 + sum((n - 1) * s for n, s in zip(src.size, src.stride, strict=True))
    temp = torch.empty(span * itemsize, dtype=torch.uint8)

    def scatter() -> None:
        with torch.no_grad():
            dest.copy_(temp.view(src.dtype).as_strided(src.size, src.stride, 0))

    return ReadItem(start, span * itemsize, temp, scatter)


def _is_contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Row-major contiguity as torch defines it (dimensions of size 1 have any stride), for
    a tensor with elements."""
    expected = 1
    for n, step in zip(reversed(size), reversed(stride), strict=True):
        if n != 1 and step != expected:
            return False
        expected *= n
    return True


def read_items(source: Any, items: list[ReadItem], direct: bytes = b"") -> None:
    """Fills every item's destination from `source` (a ``_core.io.File`` or ``BufferSource``),
    and does the reads of `direct` (uint64 (file offset, size, address) triples).

    `direct` and the contiguous CPU destinations are read into directly, all in ONE parallel
    batch (GIL released). CUDA destinations stream through the pinned staging ring straight
    into their memory (a non-contiguous one through a device temporary). Other non-contiguous
    destinations are read into a host temporary in the same batch and then copied with
    ``copy_``. All of it is one :class:`ReadBatch`.
    """
    batch = ReadBatch(source)
    finish = _gather_items(batch, source, items, direct)
    batch.run()  # the current stream is ordered after the device copies
    finish()


def _gather_items(batch: ReadBatch, source: Any, items: list[ReadItem], direct: bytes) -> Any:
    """Adds the reads of :func:`read_items` from `source` to `batch`; returns what to call
    once the batch has run (the copies out of temporaries, the items' ``then``)."""
    batch.to_host_many(direct, source)
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    seen: set[tuple[int, int, int]] = set()
    for item in items:
        if item.nbytes == 0:
            continue
        dest = item.dest
        if dest.is_contiguous() and (dest.is_cpu or dest.is_cuda):
            target = dest
        else:
            target = torch.empty(
                dest.shape, dtype=dest.dtype, device=dest.device if dest.is_cuda else "cpu"
            )
            copies.append((dest, target))
        if target.nbytes != item.nbytes:
            raise ValueError(f"read of {item.nbytes} bytes into a tensor of {target.nbytes}")
        key = (item.file_offset, item.nbytes, target.data_ptr())
        if key in seen:  # tied tensors: one read
            continue
        seen.add(key)
        if target.is_cuda:
            batch.to_device(item.file_offset, item.nbytes, target, source)
        else:
            batch.to_host(*key, source)

    def finish() -> None:
        with torch.no_grad():
            for dest, temp in copies:
                dest.copy_(temp)
        for item in items:
            if item.then is not None:
                item.then()

    return finish


def load_into(
    target: Any,
    f: FileLike,
    *,
    strict: bool = True,
    verify: bool | None = None,
    storage_options: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> IncompatibleKeys:
    """Loads the tensors of checkpoint `f` into the existing tensors of `target`, in place.

    No storage is allocated for contiguous CPU tensors: each is read straight from the file
    into its memory, all in one parallel batch. The file is unpickled with the weights-only
    rules of :func:`ckptio.load` (no code from the file runs).

    Args:
        target: a state dict (a dict, possibly nested with dicts, lists and tuples, of
            tensors, as ``torch.save`` stores them) or an ``nn.Module`` (its
            ``state_dict(keep_vars=True)`` is filled, so parameters and buffers are updated
            in place). Tensors are matched with the file's by their key path.
        f: a path or a binary file object holding a torch zip checkpoint (written by
            :func:`ckptio.save` or ``torch.save``), or a safetensors file; an ``s3://`` or
            ``http(s)://`` URL of one is read by ranged GETs (docs/remote.md).
        strict: as ``load_state_dict``'s: keys of the target missing from the file, or keys
            of the file absent from the target, raise. Shape or dtype mismatches always raise.
        verify: check the stored CRC-32 of every record read (one read in part is read
            again whole); None takes the ``verify`` setting (docs/verify.md). On a mismatch
            the target may already hold some of the file's bytes.
        storage_options: for URLs: endpoint, credentials, retries... (docs/remote.md).
        cache_dir: for URLs: a directory keeping a local copy of the object, validated
            by its ETag and size on every load (a hit reads the local file); None takes
            the ``remote_cache_dir`` setting (docs/remote.md).

    Returns:
        ``IncompatibleKeys(missing_keys, unexpected_keys)``, as ``load_state_dict``. Values of
        the file that are not tensors (an epoch counter...) are not part of the match.

    Raises:
        RuntimeError: keys, shapes or dtypes do not match (all problems in one message).
        CheckpointError: the file is malformed. ``UnsafeGlobalError``: it names a global
            that weights-only loading refuses.

    Example::

        >>> model = MyModel()
        >>> ckptio.load_into(model, "model.pt")       # parameters updated in place
        >>> ckptio.load_into(state_dict, "model.pt")  # same for a dict of tensors

    Tensors are written without autograd's knowledge (as ``load_state_dict`` under
    ``no_grad``); do not load into tensors a pending backward pass still needs.
    """
    if verify is not None and verify != get_options().verify:
        with options(verify=bool(verify)):
            return load_into(
                target, f, strict=strict, storage_options=storage_options, cache_dir=cache_dir
            )
    if isinstance(target, torch.nn.Module):
        target = target.state_dict(keep_vars=True)
    if not isinstance(target, (dict, list, tuple)):
        raise TypeError(
            f"target must be a state dict (dict of tensors) or an nn.Module, got {type(target)!r}"
        )
    from ._remote import _cache

    hit = _cache.optimistic(f, storage_options, cache_dir, False, "load_into")
    if hit is not None:  # the cached copy, read in while a thread checks it is current
        try:
            keys, error = load_into(target, hit.path, strict=strict), None
        except Exception as e:
            keys, error = None, e
        if hit.valid():
            if error is not None:
                raise error
            return keys  # type: ignore[return-value]
        # stale: refilled below, and read in over what was written
    f, storage_options = _cache.resolve(
        f, storage_options, cache_dir, "load_into", False, hit.current if hit else None
    )
    remote = _remote.source_for(f, storage_options, "load_into", False)
    layout = None
    if remote is None and _directory.is_directory_path(f):
        layout = _directory.resolve(f, storage_options, cache_dir)
    opened: list[tuple[Any, Any]] = []
    if remote is not None:
        opened.append((remote, remote))
    shards: list[Any] = [f] if layout is None else list(layout.shards)
    try:
        srcs: list[tuple[Any, dict[Path, TensorSpec | str]]] = []  # per file
        with gc_paused():  # many small objects, no cycles
            for i, shard in enumerate(shards):
                if layout is not None:
                    file = layout.open(shard)
                    opened.append((file, file))
                elif remote is None:
                    opened.append(_open(shard))
                source = opened[-1][0]
                tensors = _file_specs(source)
                if layout is not None:
                    _directory.check_shard_names(
                        layout, layout.shards[i], (_name(p) for p in tensors)
                    )
                srcs.append((source, tensors))
            dests = _flatten(target, torch.Tensor)
            name = layout.name if layout is not None else srcs[0][0].name
            plans, keys = _match(dests, srcs, strict, name)
        batch = ReadBatch(None)
        finishes = [
            _gather_items(batch, source, plan.items, plan.direct)
            for (source, _), plan in zip(srcs, plans, strict=True)
        ]
        batch.run()  # every file's reads, one plan
        for finish in finishes:
            finish()
        return keys
    finally:
        for _, file in opened:
            if file is not None:
                file.close()


def _file_specs(source: Any) -> dict[Path, TensorSpec | str]:
    """{path: TensorSpec} of every tensor of a torch zip or safetensors file."""
    head = source.pread(0, min(9, source.size))
    if _safetensors.looks_like_safetensors(head, source.size):
        return {
            (t.name,): TensorSpec((t.offset, t.dtype, 0, t.shape, contiguous_strides(t.shape)))
            for t in _safetensors.read_header(source).tensors
        }
    if not _core.zip.looks_like_zip(head[:4]):
        raise CheckpointError(
            f"{source.name}: load_into reads torch zip checkpoints (torch.save's default "
            "format) and safetensors files; this file is neither. Use ckptio.load() and "
            "load_state_dict()."
        )
    archive = ArchiveReader(source)
    if archive.has("constants.pkl"):
        raise CheckpointError(
            f"{source.name}: a TorchScript archive; load it with torch.jit.load()"
        )
    return _file_tensors(archive)


def _file_tensors(archive: ArchiveReader) -> dict[Path, TensorSpec | str]:
    """{path: TensorSpec} of every tensor of the file, or the reason it cannot be loaded
    into. Plain tensors are unpickled as TensorSpecs directly (no torch object per tensor);
    a file that needs real tensor objects (a subclass, a sparse tensor...) is unpickled over
    meta placeholders and its tensors described from those."""
    try:
        return _flatten(unpickle_specs(archive), TensorSpec)
    except NeedsTensors:
        pass
    loaded, loader = unpickle_placeholders(archive)
    out: dict[Path, TensorSpec | str] = {}
    for path, t in _flatten(loaded, torch.Tensor).items():
        if t.layout != torch.strided:
            out[path] = "only dense (strided) tensors can be loaded into"
            continue
        placed = loader.placed.get(t.untyped_storage()._cdata)
        if placed is None and t.numel():
            out[path] = "the file's tensor has no storage record"
        else:  # (an empty tensor saved without storage reads nothing)
            size, stride = tuple(t.shape), tuple(t.stride())
            offset = 0 if placed is None else placed[2]
            out[path] = TensorSpec((offset, t.dtype, int(t.storage_offset()), size, stride))
    return out


class _Plan(NamedTuple):
    direct: bytes  # uint64 (file offset, size, address) triples: reads into CPU tensors
    items: list[ReadItem]  # the other reads


def _match(
    dests: dict[Path, torch.Tensor],
    files: list[tuple[Any, dict[Path, TensorSpec | str]]],
    strict: bool,
    name: str,
) -> tuple[list[_Plan], IncompatibleKeys]:
    """The reads that fill `dests` from the tensors of `files` ((source, {path: spec}), one
    per file: a checkpoint, or the shards of a directory), one plan per file; every problem
    of every file in one RuntimeError."""
    found = {p for _, srcs in files for p in srcs}
    missing = [_name(p) for p in dests if p not in found]
    unexpected = [_name(p) for _, srcs in files for p in srcs if p not in dests]
    errors: list[str] = []
    if strict and unexpected:
        errors.append("Unexpected key(s) in the file: " + ", ".join(map(repr, unexpected)))
    if strict and missing:
        errors.append("Missing key(s) in the file: " + ", ".join(map(repr, missing)))
    plans = []
    for _, srcs in files:
        mine = dests if len(files) == 1 else {p: dests[p] for p in srcs if p in dests}
        plans.append(_match_file(mine, srcs, errors))
    if errors:
        raise RuntimeError(f"Error(s) in loading {name} into the target:\n\t" + "\n\t".join(errors))
    return plans, IncompatibleKeys(missing, unexpected)


def _match_file(
    dests: dict[Path, torch.Tensor], srcs: dict[Path, TensorSpec | str], errors: list[str]
) -> _Plan:
    # The common case in C: same dtype and shape, both contiguous, the destination on the CPU
    # (one read straight into it). The paths it leaves are matched here, in target order.
    direct, rest = _core.pickling.plan_direct_reads(dests, srcs, torch.strided)
    items: list[ReadItem] = []
    for path in rest:
        dest, src = dests[path], srcs[path]
        if type(src) is str:
            errors.append(f"{_name(path)!r}: {src}")
            continue
        assert isinstance(src, TensorSpec)
        if src.size != dest.shape or src.dtype != dest.dtype:
            errors.append(
                f"mismatch for {_name(path)!r}: the file has {src.dtype} {src.size}, "
                f"the target {dest.dtype} {tuple(dest.shape)}"
            )
            continue
        if dest.layout != torch.strided:
            errors.append(f"{_name(path)!r}: only dense (strided) tensors can be loaded into")
            continue
        numel = math.prod(src.size)
        if numel:
            items.append(_item_for(src, dest, numel))
    return _Plan(direct, items)
