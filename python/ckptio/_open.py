"""``ckptio.open``: lazy, random access to the tensors of a checkpoint.

Opening a file reads only its directory: for a torch zip file the container's records and
``data.pkl``, unpickled by the weights-only unpickler with placeholder (meta) storages, so no
tensor data is read and no code from the file runs; for a safetensors file its header. Each
tensor, or a slice of one, is then read on demand with positioned reads (``pread``) of just the
bytes it needs. Reads are thread-safe: the handle has no file position.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterator, Mapping, Sequence, TypeVar, Union, cast

import torch

from . import _core, _directory, _remote, _safetensors, _verify
from ._archive import ArchiveReader, check_version
from ._files import descriptor_file
from ._placement import Placement
from ._reads import ReadBatch
from ._unpickler import unpickle_placeholders
from ._util import contiguous_strides, walk_leaves
from .errors import CheckpointError
from .settings import get_options, options

__all__ = ["CheckpointHandle", "DirectoryHandle", "TensorInfo", "TensorSlice", "open", "rank_slice"]

Key = Union[str, tuple]
#: What get_slices takes: name -> index, or (name, shape) -> index or None.
SliceSpec = Union[Mapping[str, Any], Callable[[str, tuple], Any]]
#: A slice is read as separate contiguous ranges (one parallel batch) rather than as the one
#: range covering it when that needs at most this many ranges.
MAX_GATHER_RANGES = 1 << 16


@dataclass(frozen=True)
class TensorInfo:
    """What the file says about one tensor, known without reading its data.

    Attributes:
        name: the dotted name (the path's parts joined with ``.``).
        path: the key tuple that leads to the tensor in the saved object (``()`` for a tensor
            saved on its own; one element per dict key or list/tuple index).
        dtype, shape, stride, storage_offset: the tensor's geometry (stride and storage offset
            in elements, as in torch).
        nbytes: bytes of the tensor's elements (``numel * itemsize``).
        location: the device it was saved from (``"cpu"`` for safetensors).
        requires_grad: as saved (False for safetensors).
        is_parameter: saved as a ``torch.nn.Parameter``.
        storage: the key of its storage (tensors sharing one have the same key).
        file_offset: where the storage's bytes begin in the file.
    """

    name: str
    path: tuple
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    nbytes: int
    location: str
    requires_grad: bool
    is_parameter: bool
    storage: str
    file_offset: int


def open(  # noqa: A001
    f: str | os.PathLike[str] | IO[bytes],
    map_location: Any = None,
    *,
    verify: bool | None = None,
    storage_options: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> CheckpointHandle:
    """Opens a checkpoint (torch zip or safetensors, told apart by their bytes) for lazy reads.

    Args:
        f: a path (a model directory or its ``*.index.json`` too: one handle over every
            shard, each opened when one of its tensors is first asked about;
            docs/directories.md), or a regular file opened with ``open(path, "rb")`` (an
            ``io.FileIO`` or a buffered reader over one) positioned at its start. Other file objects
            (``BytesIO``, ``gzip.open``...) raise TypeError: read them with :func:`ckptio.load`.
            An ``s3://`` or ``http(s)://`` URL reads the object by ranged GETs: the header
            when opened, then only the bytes each read needs (docs/remote.md).
        map_location: where tensors read through the handle go, with :func:`ckptio.load`'s
            meaning (None: where they were saved; ``"meta"``: nothing is read).
        verify: check the stored CRC-32 of every record a read touches (a record read in
            part is read again whole to check it); None takes the ``verify`` setting at
            open time (docs/verify.md).
        storage_options: for URLs: endpoint, credentials, retries... (docs/remote.md).
        cache_dir: for URLs: a directory keeping a local copy of the object, validated
            by its ETag and size on every load (a hit reads the local file); None takes
            the ``remote_cache_dir`` setting (docs/remote.md).

    Returns:
        A :class:`CheckpointHandle` (a context manager).

    Example::

        >>> with ckptio.open("model.pt") as ck:
        ...     print(ck.keys()[:3], ck.info("fc.weight").shape)
        ...     w = ck["fc.weight"]
        ...     rows = ck.get_slice("fc.weight")[0:10]  # reads only those rows
    """
    if verify is not None and verify != get_options().verify:
        with options(verify=bool(verify)):
            return open(f, map_location, storage_options=storage_options, cache_dir=cache_dir)
    from ._remote._cache import resolve as _cached

    f, storage_options = _cached(f, storage_options, cache_dir, "open", False)
    remote = _remote.source_for(f, storage_options, "open", False)
    if remote is not None:
        try:
            return CheckpointHandle(cast(Any, remote), map_location)
        except BaseException:
            remote.close()
            raise
    if _directory.is_directory_path(f):
        layout = _directory.resolve(f, storage_options, cache_dir)
        if layout.weight_map is None:  # a directory of one weights file: that file
            return open(
                layout.path(layout.shards[0]),
                map_location,
                storage_options=layout.storage_options,
                cache_dir=cache_dir,
            )
        return DirectoryHandle(layout, map_location)  # type: ignore[return-value]
    if isinstance(f, (str, bytes, os.PathLike)):
        file = _core.io.File.open(os.fsdecode(f), _core.io.FileMode.READ)
    else:
        adopted = descriptor_file(f)
        if adopted is None:
            # Its bytes are not those of a descriptor (BytesIO, gzip.open...), or it is not
            # at the file's start: there is nothing to pread.
            raise TypeError(
                "ckptio.open needs a path or a file opened with open(path, 'rb') and "
                f"positioned at its start (it reads with pread), got {type(f).__name__}; "
                "ckptio.load reads any seekable binary file object"
            )
        file = adopted
    try:
        return CheckpointHandle(file, map_location)
    except BaseException:
        file.close()
        raise


class _ReadGate:
    """What both handles share: reads in flight are counted so that close() waits for them,
    and reads through the staging rings (one per device for the handle's life: pinned memory
    is costly to allocate) take them in turn."""

    name: str

    def __init__(self) -> None:
        self._ring_lock = threading.Lock()
        self._lock = threading.Condition()
        self._active = 0
        self._closed = False

    def _run(self, batch: ReadBatch, staged: bool) -> None:
        """Runs `batch` unless the handle is closed; `staged`: it goes through the rings."""
        if not batch:
            return
        with self._lock:
            if self._closed:
                raise ValueError(f"{self.name}: read from a closed checkpoint handle")
            self._active += 1
        try:
            with self._ring_lock if staged else contextlib.nullcontext():
                batch.run()
        finally:
            with self._lock:
                self._active -= 1
                self._lock.notify_all()

    def _shut(self) -> None:
        """Refuses new reads and waits for those in flight."""
        with self._lock:
            self._closed = True
            while self._active:
                self._lock.wait()

    def close(self) -> None:
        self._shut()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self: _Gate) -> _Gate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_Gate = TypeVar("_Gate", bound=_ReadGate)


class CheckpointHandle(_ReadGate):
    """Lazy view of a checkpoint; see :func:`open`.

    Tensors are addressed by their dotted name (``"model.layers.0.weight"``: for a flat state
    dict simply its key) or by their key tuple (``("model", "layers.0.weight")``). A dotted
    name that two paths share (``{"a.b": x, "a": {"b": y}}``) is ambiguous: looking it up
    raises KeyError naming the key tuples to use instead.
    """

    def __init__(
        self, file: _core.io.File, map_location: Any, placement: Placement | None = None
    ) -> None:
        self._file = file
        self.name = file.name
        self.map_location = map_location
        # The shards of a directory share their DirectoryHandle's placement (and rings).
        self._owns_placement = placement is None
        self._placement = placement or Placement(map_location, self.name)
        super().__init__()
        self._meta_objects: dict[tuple, torch.Tensor] = {}
        self.metadata: dict[str, str] = {}
        self.non_tensors: dict[str, Any] = {}
        self.paths_of_non_tensors: dict[tuple, Any] = {}
        self._infos: dict[tuple, TensorInfo] = {}
        head = file.pread(0, min(9, file.size))
        if _safetensors.looks_like_safetensors(head, file.size):
            self.format = "safetensors"
            self._open_safetensors()
        elif _core.zip.looks_like_zip(head[:4]):
            self.format = "torch"
            self._open_torch()
        else:
            raise CheckpointError(
                f"{self.name}: neither a torch zip checkpoint nor a safetensors file "
                f"(it starts with {head!r}); legacy torch files can only be read with load()"
            )
        self._by_name: dict[str, list[tuple]] = {}
        for path, info in self._infos.items():
            self._by_name.setdefault(info.name, []).append(path)
        self.data_offsets: list[int] = sorted({i.file_offset for i in self._infos.values()})

    # -- opening ---------------------------------------------------------------------------
    def _open_safetensors(self) -> None:
        header = _safetensors.read_header(self._file)
        self.metadata = dict(header.metadata)
        self.data_start = header.data_start
        for i, t in enumerate(header.tensors):
            self._infos[(t.name,)] = TensorInfo(
                name=t.name,
                path=(t.name,),
                dtype=t.dtype,
                shape=t.shape,
                stride=contiguous_strides(t.shape),
                storage_offset=0,
                nbytes=t.nbytes,
                location="cpu",
                requires_grad=False,
                is_parameter=False,
                storage=str(i),
                file_offset=t.offset,
            )
        order = header.order
        self._infos = {(k,): self._infos[(k,)] for k in order}

    def _open_torch(self) -> None:
        archive = ArchiveReader(self._file)
        self.archive = archive
        if archive.has("constants.pkl"):
            raise CheckpointError(
                f"{self.name}: a TorchScript archive; open it with torch.jit.load"
            )
        if archive.has("byteorder") and archive.read("byteorder") != sys.byteorder.encode():
            raise CheckpointError(
                f"{self.name}: saved with a different byte order; read it with ckptio.load"
            )
        check_version(archive)
        obj, loader = unpickle_placeholders(archive)
        for path, value in walk_leaves(obj):
            name = ".".join(str(p) for p in path)
            if isinstance(value, torch.Tensor) and value.layout == torch.strided:
                placed = loader.placed.get(value.untyped_storage()._cdata)
                if placed is None:  # a tensor without storage (saved on meta)
                    self.paths_of_non_tensors[path] = value
                    self.non_tensors[name] = value
                    continue
                key, location, record_offset = placed
                self._meta_objects[path] = value
                self._infos[path] = TensorInfo(
                    name=name,
                    path=path,
                    dtype=value.dtype,
                    shape=tuple(value.shape),
                    stride=tuple(value.stride()),
                    storage_offset=int(value.storage_offset()),
                    nbytes=value.numel() * value.element_size(),
                    location=location,
                    requires_grad=value.requires_grad,
                    is_parameter=isinstance(value, torch.nn.Parameter),
                    storage=key,
                    file_offset=record_offset,
                )
            else:
                self.paths_of_non_tensors[path] = value
                self.non_tensors[name] = value

    # -- lookups ---------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Dotted names of the tensors, in the saved object's order (each name once)."""
        return list(self._by_name)

    def paths(self) -> list[tuple]:
        """Key tuples of the tensors, in the saved object's order."""
        return list(self._infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, key: object) -> bool:
        try:
            self._path(key)  # type: ignore[arg-type]
        except KeyError:
            return False
        return True

    def _path(self, key: Key) -> tuple:
        if isinstance(key, tuple):
            if key in self._infos:
                return key
            raise KeyError(f"{self.name}: no tensor at key path {key!r}")
        if isinstance(key, str):
            paths = self._by_name.get(key)
            if paths is None:
                raise KeyError(f"{self.name}: no tensor named {key!r}")
            if len(paths) > 1:
                raise KeyError(
                    f"{self.name}: the name {key!r} is ambiguous; use one of the key tuples "
                    f"{', '.join(repr(p) for p in paths)}"
                )
            return paths[0]
        raise TypeError(f"tensor keys are dotted names (str) or key tuples, got {type(key)!r}")

    def info(self, key: Key) -> TensorInfo:
        """The :class:`TensorInfo` of one tensor (no data is read)."""
        return self._infos[self._path(key)]

    def infos(self) -> list[TensorInfo]:
        """Every tensor's :class:`TensorInfo`, in order."""
        return list(self._infos.values())

    # -- reads -----------------------------------------------------------------------------
    def __getitem__(self, key: Key) -> torch.Tensor:
        return self.get_tensor(key)

    def get_tensor(self, key: Key) -> torch.Tensor:
        """Reads one tensor (only its bytes) with its saved dtype and shape. Its strides are
        the saved ones when its elements lie dense in the file (contiguous or permuted);
        a view of part of a larger storage is read as its runs and comes back contiguous."""
        return self.get_tensors([key])[key]

    def get_tensors(self, keys: Sequence[Key] | None = None) -> dict[Key, torch.Tensor]:
        """Reads several tensors (all when `keys` is None) in one parallel batch. Returns a
        dict keyed as asked (when `keys` is None: by dotted name, or by key tuple if some
        dotted names are ambiguous). Tensors that shared a storage in the file come back as
        independent copies."""
        if keys is None:
            keys = self.keys() if len(self._by_name) == len(self._infos) else self.paths()
        plans = []
        for key in keys:
            info = self.info(key)
            plans.append(
                (key, info, _plan_read(info, info.storage_offset, info.shape, info.stride))
            )
        tensors = self._read(plans)
        return {key: _as_saved(info, t) for (key, info, _), t in zip(plans, tensors, strict=True)}

    def get_slice(self, key: Key) -> TensorSlice:
        """A :class:`TensorSlice`: index it (``[0:10]``, ``[:, 2:4]``, ``[..., 0]``) to read
        only the bytes of that part of the tensor."""
        return TensorSlice(self, self.info(key))

    def get_slices(self, slices: SliceSpec) -> dict[str, torch.Tensor]:
        """Reads part of many tensors in one parallel batch: what one rank of a tensor- or
        expert-parallel group needs (docs/directories.md, "Per-rank slices").

        `slices` maps tensor names to an index (as :meth:`get_slice`'s ``[...]`` takes:
        ints, slices, ``...``; :func:`rank_slice` builds the usual row and column splits), or
        is a callable ``(name, shape) -> index | None`` asked for every tensor (None: skip
        it). Only the bytes of each part are read: a row slice is one range, a column slice
        the strided runs of its rows, coalesced where they touch. Returns the parts by name.
        """
        if callable(slices):
            wanted = []
            for name in self.keys():
                index = slices(name, self.info(name).shape)
                if index is not None:
                    wanted.append((name, index))
        else:
            wanted = list(slices.items())
        plans = [
            (name, info, _plan_index(info, index))
            for name, index in wanted
            for info in (self.info(name),)
        ]
        return dict(zip((name for name, _ in wanted), self._read(plans), strict=True))

    def _read(self, plans: list[tuple[Any, TensorInfo, _ReadPlan]]) -> list[torch.Tensor]:
        """Reads each plan's ranges in one batch: into fresh host memory, or for a CUDA
        map_location straight into device memory through the pinned staging ring; then
        places the storages as ckptio.load would (:class:`Placement`)."""
        batch = ReadBatch(self._file)
        buffers, staged = self._gather(plans, batch)
        try:
            self._run(batch, staged)
        except _verify.CorruptRecord as e:  # verify: name the tensors of the record
            names = [i.name for i in self.infos() if "data/" + str(i.storage) == e.record]
            raise (e.naming("tensor " + ", ".join(map(repr, names[:5]))) if names else e) from None
        return self._finish(plans, buffers)

    def _gather(
        self, plans: list[tuple[Any, TensorInfo, _ReadPlan]], batch: ReadBatch
    ) -> tuple[list[tuple[torch.Tensor, bool] | None], bool]:
        """Memory for each plan and its reads (from this handle's file) added to `batch`:
        ((memory, on its device) or None where nothing is read, whether a ring is used)."""
        placement = self._placement
        meta = placement.is_meta
        source = self._file
        staged = False
        buffers: list[tuple[torch.Tensor, bool] | None] = []
        for _key, info, plan in plans:
            if meta or plan.nbytes == 0:
                buffers.append(None)
                continue
            target = placement.staged_target(info.location)
            if target is not None:
                memory = target.allocate(plan.nbytes)
                at = 0
                for start, length in plan.ranges:
                    batch.to_target(
                        target, info.file_offset + start, length, memory[at : at + length], source
                    )
                    at += length
                buffers.append((memory, True))
                staged = True
                continue
            buf = torch.empty(plan.nbytes, dtype=torch.uint8)
            address = buf.data_ptr()
            for start, length in plan.ranges:
                batch.to_host(info.file_offset + start, length, address, source)
                address += length
            buffers.append((buf, False))
        return buffers, staged

    def _finish(
        self,
        plans: list[tuple[Any, TensorInfo, _ReadPlan]],
        buffers: list[tuple[torch.Tensor, bool] | None],
    ) -> list[torch.Tensor]:
        """The tensors of `plans` over the memory :meth:`_gather` gave them, once read."""
        placement = self._placement
        meta = placement.is_meta
        out = []
        for (_key, info, plan), held in zip(plans, buffers, strict=True):
            if held is None:
                device = "meta" if meta else "cpu"
                storage = torch.UntypedStorage(plan.nbytes, device=device)
            else:
                storage = held[0].untyped_storage()
            if not meta and (held is None or not held[1]):
                storage = placement.restore(storage, info.location)
            t = torch.empty((0,), dtype=info.dtype, device=storage.device)
            out.append(t.set_(storage, plan.offset, plan.shape, plan.stride))
        return out

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Closes the file once reads in flight have finished. Tensors already read stay
        valid."""
        self._shut()
        if self._owns_placement:
            self._placement.close()  # the pinned staging rings
        self._file.close()

    def __repr__(self) -> str:
        return f"<ckptio checkpoint {self.name!r}: {self.format}, {len(self)} tensors>"


class TensorSlice:
    """A tensor not read yet; indexing it reads the part asked for.

    Supports ints, slices with positive steps, ``...`` and ``None``; the result is a new
    tensor (not a view of the file). Reading: a part that is one contiguous run of the
    tensor's bytes (e.g. ``[a:b]`` of a contiguous tensor) costs one read of exactly those
    bytes; otherwise the part is read as its contiguous runs in one parallel batch (at most
    65,536 runs; beyond that, the one byte range covering the part is read).
    """

    def __init__(self, handle: CheckpointHandle, info: TensorInfo) -> None:
        self._handle = handle
        self.info = info

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.info.dtype

    def get_shape(self) -> list[int]:
        """As safetensors' ``PySafeSlice.get_shape``."""
        return list(self.info.shape)

    def __getitem__(self, index: Any) -> torch.Tensor:
        info = self.info
        (t,) = self._handle._read([(info.name, info, _plan_index(info, index))])
        return t


# ------------------------------------------------------------------------------ read planning
def _plan_index(info: TensorInfo, index: Any) -> _ReadPlan:
    """The read plan of ``tensor[index]`` for the tensor `info` describes."""
    last = info.storage_offset + sum(
        (n - 1) * s for n, s in zip(info.shape, info.stride, strict=True)
    )
    numel = last + 1 if all(info.shape) else 0
    base = torch.empty(max(numel, 0), dtype=info.dtype, device="meta")
    geometry = base.as_strided(info.shape, info.stride, info.storage_offset)
    try:
        view = geometry[index]
    except IndexError:
        raise
    except Exception as e:
        raise IndexError(f"cannot index {info.name!r} with {index!r}: {e}") from None
    if not view._is_view() or view._base is not base:
        raise IndexError(
            "get_slice supports ints, slices, ... and None; read the tensor with "
            "get_tensor() for advanced (list or tensor) indexing"
        )
    return _plan_read(info, int(view.storage_offset()), tuple(view.shape), tuple(view.stride()))


def rank_slice(shape: Sequence[int], rank: int, world_size: int, dim: int = 0) -> tuple[Any, ...]:
    """The index of rank `rank`'s part of a tensor of `shape` split `world_size` ways along
    `dim` (0: rows, -1: columns), as :func:`torch.tensor_split` splits it (when `world_size`
    divides the size, equal parts). For :meth:`CheckpointHandle.get_slices`::

        h.get_slices(lambda name, shape: rank_slice(shape, rank, world, dim=0))
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    ndim = len(shape)
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim {dim} is out of range for a tensor of {ndim} dimensions")
    dim %= ndim
    size, extra = divmod(shape[dim], world_size)
    start = rank * size + min(rank, extra)
    stop = start + size + (1 if rank < extra else 0)
    return (slice(None),) * dim + (slice(start, stop),)


@dataclass(frozen=True)
class _ReadPlan:
    ranges: list[tuple[int, int]]  # (byte offset within the storage record, length)
    nbytes: int  # bytes read in all
    offset: int  # storage offset (elements) of the result within what was read
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _plan_read(
    info: TensorInfo, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]
) -> _ReadPlan:
    """The bytes to read for the view (offset, shape, stride) of a storage, and the geometry
    of the result within them."""
    itemsize = info.dtype.itemsize
    numel = math.prod(shape)
    if numel == 0:
        return _ReadPlan([], 0, 0, shape, stride)
    dims = [(n, s) for n, s in zip(shape, stride, strict=True) if n != 1]
    lo = offset + sum((n - 1) * s for n, s in dims if s < 0)
    hi = offset + sum((n - 1) * s for n, s in dims if s > 0)
    covering = _ReadPlan(
        [(lo * itemsize, (hi - lo + 1) * itemsize)],
        (hi - lo + 1) * itemsize,
        offset - lo,
        shape,
        stride,
    )
    if hi - lo + 1 == numel:
        return covering  # dense already (contiguous or a permutation of it)
    # The row-major contiguous suffix of the dims is one run; the outer dims enumerate runs.
    run = 1
    j = len(dims)
    while j > 0 and dims[j - 1][1] == run:
        run *= dims[j - 1][0]
        j -= 1
    outer = dims[:j]
    count = math.prod(n for n, _ in outer)
    if count > MAX_GATHER_RANGES or any(s < 0 for _, s in outer):
        return covering
    starts = [offset]
    for n, s in outer:
        starts = [a + i * s for a in starts for i in range(n)]
    ranges = _merge([(a * itemsize, run * itemsize) for a in starts])
    contiguous = contiguous_strides(shape)
    return _ReadPlan(ranges, numel * itemsize, 0, shape, contiguous)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, length in ranges:
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((start, length))
    return out


class DirectoryHandle(_ReadGate):
    """One lazy handle over the shards of a model directory; see :func:`open`.

    Names come from the index, so listing them opens no shard; a shard is opened (its header,
    or its container and pickle) the first time one of its tensors is asked about, and is
    then checked against the index. Reads of tensors from several shards go out as one
    parallel batch. Tensors are addressed by name (the index's keys).
    """

    format = "directory"

    def __init__(self, layout: _directory.Layout, map_location: Any) -> None:
        assert layout.weight_map is not None
        self.layout = layout
        self.name = layout.name
        self.map_location = map_location
        self.metadata: dict[str, str] = {}
        self._weight_map = layout.weight_map
        self._placement = Placement(map_location, self.name)
        self._shards: dict[str, CheckpointHandle] = {}
        self._open_lock = threading.Lock()
        super().__init__()

    # -- shards ----------------------------------------------------------------------------
    def shard(self, name: str) -> CheckpointHandle:
        """The handle of shard file `name` (opened and checked on first use)."""
        with self._open_lock:
            if self._closed:
                raise ValueError(f"{self.name}: read from a closed checkpoint handle")
            handle = self._shards.get(name)
            if handle is None:
                file = self.layout.open(name)
                try:
                    handle = CheckpointHandle(file, self.map_location, self._placement)
                    _directory.check_shard_names(self.layout, name, handle.keys())
                except BaseException:
                    file.close()
                    raise
                self._shards[name] = handle
            return handle

    def _shard_of(self, key: Key) -> CheckpointHandle:
        if not isinstance(key, str):
            raise TypeError(f"tensors of a directory are named by str, got {type(key)!r}")
        shard = self._weight_map.get(key)
        if shard is None:
            raise KeyError(f"{self.name}: no tensor named {key!r}")
        return self.shard(shard)

    # -- lookups ---------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Tensor names, in the index's order (no shard is opened)."""
        return list(self._weight_map)

    def paths(self) -> list[tuple]:
        return [(k,) for k in self._weight_map]

    def __iter__(self) -> Iterator[str]:
        return iter(self._weight_map)

    def __len__(self) -> int:
        return len(self._weight_map)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._weight_map

    def info(self, key: Key) -> TensorInfo:
        """The :class:`TensorInfo` of one tensor (opens its shard; no data is read). Its
        ``file_offset`` is within its shard, :meth:`shard_of` names which."""
        return self._shard_of(key).info(key)

    def shard_of(self, key: str) -> str:
        """The file name of the shard that holds tensor `key`."""
        self._shard_of(key)
        return self._weight_map[key]

    def infos(self) -> list[TensorInfo]:
        return [self.info(k) for k in self._weight_map]

    # -- reads -----------------------------------------------------------------------------
    def __getitem__(self, key: Key) -> torch.Tensor:
        return self.get_tensor(key)

    def get_tensor(self, key: Key) -> torch.Tensor:
        return self.get_tensors([key])[key]

    def get_tensors(self, keys: Sequence[Key] | None = None) -> dict[Key, torch.Tensor]:
        """Reads several tensors (all when `keys` is None), from every shard they are in, in
        one parallel batch."""
        keys = self.keys() if keys is None else keys
        out: dict[Key, torch.Tensor] = {}
        by_shard: dict[str, list[Key]] = {}
        for key in keys:
            self._shard_of(key)
            by_shard.setdefault(self._weight_map[key], []).append(key)  # type: ignore[index]
        self._read_many(
            {s: [(k, *_whole(self.shard(s).info(k))) for k in ks] for s, ks in by_shard.items()},
            out,
            tensors=True,
        )
        return {k: out[k] for k in keys}

    def get_slice(self, key: Key) -> TensorSlice:
        """A :class:`TensorSlice` of one tensor (see :meth:`CheckpointHandle.get_slice`)."""
        return TensorSlice(self, self.info(key))  # type: ignore[arg-type]

    def get_slices(self, slices: SliceSpec) -> dict[str, torch.Tensor]:
        """As :meth:`CheckpointHandle.get_slices`, over every shard in one batch."""
        if callable(slices):
            wanted = [
                (name, index)
                for name in self.keys()
                for index in (slices(name, self.info(name).shape),)
                if index is not None
            ]
        else:
            wanted = list(slices.items())
        by_shard: dict[str, list[tuple[Any, TensorInfo, _ReadPlan]]] = {}
        for name, index in wanted:
            info = self.info(name)
            by_shard.setdefault(self._weight_map[name], []).append(
                (name, info, _plan_index(info, index))
            )
        out: dict[Key, torch.Tensor] = {}
        self._read_many(by_shard, out, tensors=False)
        return {name: out[name] for name, _ in wanted}  # type: ignore[misc]

    def _read(self, plans: list[tuple[Any, TensorInfo, _ReadPlan]]) -> list[torch.Tensor]:
        """What a :class:`TensorSlice` calls: plans of tensors named by ``info.name``."""
        by_shard: dict[str, list[tuple[Any, TensorInfo, _ReadPlan]]] = {}
        for i, (_key, info, plan) in enumerate(plans):
            by_shard.setdefault(self._weight_map[info.name], []).append((i, info, plan))
        out: dict[Key, torch.Tensor] = {}
        self._read_many(by_shard, out, tensors=False)
        return [out[i] for i in range(len(plans))]  # type: ignore[index]

    def _read_many(
        self,
        by_shard: dict[str, list[tuple[Any, TensorInfo, _ReadPlan]]],
        out: dict[Any, torch.Tensor],
        *,
        tensors: bool,
    ) -> None:
        batch = ReadBatch(None)
        gathered = []
        staged = False
        for shard, plans in by_shard.items():
            handle = self.shard(shard)
            buffers, on_ring = handle._gather(plans, batch)
            staged = staged or on_ring
            gathered.append((handle, plans, buffers))
        self._run(batch, staged)
        for handle, plans, buffers in gathered:
            for (key, info, _), t in zip(plans, handle._finish(plans, buffers), strict=True):
                out[key] = _as_saved(info, t) if tensors else t

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Closes every shard opened, once reads in flight have finished."""
        self._shut()
        with self._open_lock:
            for handle in self._shards.values():
                handle.close()
        self._placement.close()

    def __repr__(self) -> str:
        opened = f"{len(self._shards)} of {len(self.layout.shards)} shards open"
        return f"<ckptio model directory {self.name!r}: {opened}, {len(self)} tensors>"


def _whole(info: TensorInfo) -> tuple[TensorInfo, _ReadPlan]:
    return info, _plan_read(info, info.storage_offset, info.shape, info.stride)


def _as_saved(info: TensorInfo, t: torch.Tensor) -> torch.Tensor:
    """`t` as get_tensor returns it: a Parameter or requiring grad where it was saved so."""
    if info.is_parameter:
        return torch.nn.Parameter(t, requires_grad=info.requires_grad)
    if info.requires_grad and (t.is_floating_point() or t.is_complex()):
        t.requires_grad_(True)
    return t
