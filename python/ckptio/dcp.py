"""``torch.distributed.checkpoint`` storage with ckptio's aligned parallel I/O.

:class:`Writer` and :class:`Reader` plug into ``torch.distributed.checkpoint.save`` /
``load`` / ``async_save`` in place of ``FileSystemWriter`` / ``FileSystemReader``.

Layout of a checkpoint directory (docs/training.md):

- ``__<rank>_0.ckptio``, one per rank: a zip archive (stored, no compression) with one record
  per item the rank saves, named by its position. Tensor records hold the tensor's raw bytes
  (C order, native byte order) starting on a 4096-byte boundary; byte items (the non-tensor
  state DCP pickles with ``torch.save``) hold those bytes unchanged. The file is written by
  ckptio's parallel ``pwrite`` path, not one ``torch.save`` zip per tensor; CUDA tensors
  stream out through the pinned staging ring (no whole host copy).
- ``.metadata``: DCP's ``Metadata`` (pickled, as ``FileSystemWriter`` writes it), whose
  ``storage_data`` maps every item to a :class:`StorageInfo` (file, offset, length, dtype,
  shape). Written last, through a temporary file and a rename.

Loading reads, for every requested piece, only the byte range of the stored tensor that
covers it (a row-sharded piece is one contiguous range), straight into the destination
tensor when it is a contiguous CPU tensor of the stored dtype (a CUDA one through the pinned
staging ring), and reads all pieces of a file in one batch (``_reads.ReadBatch``).
Resharding (save with N ranks, load with M) works because DCP's planner expresses every
request as offsets and lengths into a stored chunk.

The metadata is unpickled with an allowlist (DCP's metadata classes, torch dtypes/sizes);
byte items are decoded weights-only by default before the planner sees them, so loading
never runs code from the checkpoint (the stock reader's planner calls
``torch.load(weights_only=False)`` on them).

:class:`Reader` also reads checkpoints written by the stock ``FileSystemWriter`` (through
torch's reader, with the same metadata allowlist and weights-only byte items).
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import uuid
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo as _StockStorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.staging import BlockingAsyncStager
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from . import _core, serialization
from ._align import ALIGNMENT
from ._archive import ArchiveReader
from ._files import atomic_file, write_bytes
from ._reads import ReadBatch
from ._unpickler import needs_dict_memo
from ._util import contiguous_strides
from ._writer import tensor_payload, write_archive
from .errors import CheckpointError
from .settings import get_options, options

__all__ = ["Reader", "StorageInfo", "Writer"]

METADATA_NAME = ".metadata"
FILE_SUFFIX = ".ckptio"
DCP_VERSION = "1.0.0"  # the Metadata version FileSystemWriter writes in torch 2.13
TENSOR_ALIGNMENT = 4096


@dataclasses.dataclass(frozen=True)
class StorageInfo:
    """Where one saved item lives: ``length`` bytes at ``offset`` of ``relative_path``.
    Tensors also record their dtype (``"float32"``...) and shape (the stored chunk's)."""

    relative_path: str
    offset: int
    length: int
    dtype: str | None = None
    shape: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class _Prefix:
    prefix: str


class _DirectoryCheckpoint:
    """What Writer and Reader share: a checkpoint is the directory at ``self.path``."""

    path: str

    @property
    def checkpoint_id(self) -> str:
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return FileSystem.validate_checkpoint_id(checkpoint_id)


class Writer(_DirectoryCheckpoint, StorageWriter, BlockingAsyncStager):
    """A DCP ``StorageWriter`` writing one page-aligned file per rank with ckptio's I/O.

    Args:
        path: the checkpoint directory (created if missing).
        durable: fsync every file and the directory before ``save`` returns (as
            ``FileSystemWriter(sync_files=True)``, its default).
        overwrite: allow saving over an existing checkpoint in `path`.
        cache_staged_state_dict: for ``dcp.async_save``: keep the CPU staging copy between
            saves (as ``FileSystemWriter``).

    Example::

        >>> import torch.distributed.checkpoint as dcp
        >>> dcp.save(state_dict, storage_writer=ckptio.dcp.Writer("ckpt/step100"))
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        durable: bool = True,
        overwrite: bool = True,
        cache_staged_state_dict: bool = False,
    ) -> None:
        StorageWriter.__init__(self)
        BlockingAsyncStager.__init__(self, cache_staged_state_dict=cache_staged_state_dict)
        self.path = os.fspath(path)
        self.durable = durable
        self.overwrite = overwrite
        self.save_id = str(uuid.uuid4())
        self.rank: int | None = None
        self.use_collectives = True

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id:
            self.path = os.fspath(checkpoint_id)
        self.save_id = str(uuid.uuid4())

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.rank = kwargs.get("rank")
        self.use_collectives = kwargs.get("use_collectives", True)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        os.makedirs(self.path, exist_ok=True)
        if not self.overwrite and os.path.exists(self._metadata_path()):
            raise RuntimeError(
                f"{self.path}: a checkpoint exists and overwrite=False; choose another "
                "directory or pass overwrite=True"
            )
        if self.rank is not None and not self.use_collectives:
            plan = dataclasses.replace(plan, storage_data=_Prefix(f"__{self.rank}_"))
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # Saving over a checkpoint: drop its metadata before any rank rewrites its file, so a
        # crash mid-save leaves a directory that is visibly incomplete, never old metadata
        # pointing into new files. (Runs on the coordinator, after every rank's local plan.)
        try:
            os.unlink(self._metadata_path())
        except FileNotFoundError:
            pass
        return [
            dataclasses.replace(p, storage_data=_Prefix(f"__{i}_")) if p.storage_data is None else p
            for i, p in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        prefix = plan.storage_data.prefix if plan.storage_data is not None else "__0_"
        relative = f"{prefix}0{FILE_SUFFIX}"
        specs: list[tuple[str, int, int]] = []
        payloads: list[Any] = []
        keep_alive: list[torch.Tensor] = []
        infos: list[tuple[Any, str | None, tuple[int, ...] | None]] = []
        copiers: dict[torch.device, Any] = {}  # the staging copier of each device, or None
        for i, item in enumerate(plan.items):
            data: Any = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                raw = data.getvalue() if isinstance(data, io.BytesIO) else bytes(data.read())
                specs.append((str(i), len(raw), ALIGNMENT))
                payloads.append(raw)
                infos.append((item.index, None, None))
                continue
            tensor: torch.Tensor = data.detach().contiguous()
            nbytes = tensor.numel() * tensor.element_size()
            payload, held = tensor_payload(tensor, copiers)  # CUDA: through the ring
            keep_alive.append(held)
            specs.append((str(i), nbytes, TENSOR_ALIGNMENT))
            payloads.append(payload)
            infos.append(
                (item.index, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))
            )
        with _core.io.File.open(
            os.path.join(self.path, relative), _core.io.FileMode.CREATE
        ) as file:
            offsets = write_archive(
                file, "archive", specs, payloads, crc32=get_options().write_crc32
            )
            if self.durable:
                file.sync()
        del keep_alive
        results = [
            WriteResult(
                index=index,
                size_in_bytes=size,
                storage_data=StorageInfo(relative, offset, size, dtype, shape),
            )
            for (index, dtype, shape), (_, size, _), offset in zip(
                infos, specs, offsets, strict=True
            )
        ]
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.version = DCP_VERSION
        metadata.storage_data = {wr.index: wr.storage_data for rs in results for wr in rs}
        metadata.storage_meta = self.storage_meta()
        with atomic_file(self._metadata_path(), self.durable) as file:
            write_bytes(file, pickle.dumps(metadata))

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path, save_id=self.save_id)

    def _metadata_path(self) -> str:
        if not self.use_collectives and self.rank is not None:
            return os.path.join(self.path, f"__{self.rank}{METADATA_NAME}")
        return os.path.join(self.path, METADATA_NAME)


class Reader(_DirectoryCheckpoint, StorageReader):
    """A DCP ``StorageReader`` for checkpoints written by :class:`Writer`.

    Args:
        path: the checkpoint directory.
        weights_only: decode byte items (non-tensor state) with the weights-only loader and
            hand the planner a re-encoding of the result, so the planner's own
            ``torch.load(weights_only=False)`` never sees bytes from the file. False passes
            the stored bytes through unchanged: only for checkpoints you trust.
        verify: check the stored CRC-32 of every record read (files written with
            ``write_crc32``; docs/verify.md); None takes the ``verify`` setting at each read.

    Example::

        >>> dcp.load(state_dict, storage_reader=ckptio.dcp.Reader("ckpt/step100"))
    """

    def __init__(
        self, path: str | os.PathLike, *, weights_only: bool = True, verify: bool | None = None
    ) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.weights_only = weights_only
        self.verify = verify
        self.storage_data: dict[MetadataIndex, StorageInfo] = {}
        self.load_id = str(uuid.uuid4())
        self.rank: int | None = None
        self._stock: FileSystemReader | None = None

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self.storage_data = {}
        if checkpoint_id:
            self.path = os.fspath(checkpoint_id)
        self.load_id = str(uuid.uuid4())

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = METADATA_NAME if rank is None else f"__{rank}{METADATA_NAME}"
        path = os.path.join(self.path, name)
        with open(path, "rb") as f:
            metadata = _unpickle_metadata(f.read(), path)
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP Metadata")
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        storage = metadata.storage_data or {}
        self._stock = None
        if storage and all(isinstance(i, _StockStorageInfo) for i in storage.values()):
            # A FileSystemWriter checkpoint: torch's reader moves its bytes (its tensors
            # load weights-only); byte items still pass through _decode_bytes.
            self._stock = FileSystemReader(self.path)
            self._stock.set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        else:
            for index, info in storage.items():
                if not isinstance(info, StorageInfo):
                    raise CheckpointError(
                        f"{self.path}: item {index.fqn!r} has storage information of type "
                        f"{type(info).__name__}, written by neither ckptio.dcp.Writer nor "
                        "FileSystemWriter; read it with the reader that matches its writer"
                    )
        self.storage_data = storage
        self.rank = kwargs.get("rank")

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if self._stock is not None:
            if self.weights_only:
                planner = _WeightsOnlyBytes(planner, self)  # type: ignore[assignment]
            return self._stock.read_data(plan, planner)
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self._info(item).relative_path, []).append(item)
        for relative, items in per_file.items():
            self._read_file(os.path.join(self.path, relative), items, planner)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _info(self, item: ReadItem) -> StorageInfo:
        try:
            return self.storage_data[item.storage_index]
        except KeyError:
            raise CheckpointError(
                f"{self.path}: the metadata has no stored item for {item.storage_index}"
            ) from None

    def _read_file(self, path: str, items: list[ReadItem], planner: LoadPlanner) -> None:
        with _core.io.File.open(path, _core.io.FileMode.READ) as file:
            if get_options().verify if self.verify is None else self.verify:
                # The CRC-32s its records declare, attached to the file: every read below
                # is checked (_verify.py).
                with options(verify=True):
                    ArchiveReader(file)
            size = file.size
            batch = ReadBatch(file)
            pending: list[tuple[ReadItem, torch.Tensor, torch.Tensor | None]] = []
            byte_items: list[ReadItem] = []
            for item in items:
                info = self._info(item)
                if info.offset + info.length > size:
                    raise CheckpointError(
                        f"{path}: item {item.storage_index.fqn!r} ends at byte "
                        f"{info.offset + info.length}, past the end of the file ({size} bytes)"
                    )
                if item.type == LoadItemType.BYTE_IO:
                    byte_items.append(item)
                    continue
                target = planner.resolve_tensor(item).detach()
                staged = self._plan_tensor_read(path, item, info, target, batch)
                pending.append((item, target, staged))
            batch.run()  # host memory in one batch (GIL released); CUDA through the ring
            for item, target, staged in pending:
                if staged is not None:
                    target.copy_(staged)
                planner.commit_tensor(item, target)
            for item in byte_items:
                info = self._info(item)
                raw = file.pread(info.offset, info.length)
                planner.load_bytes(item, io.BytesIO(self._decode_bytes(path, item, raw)))

    def _plan_tensor_read(
        self,
        path: str,
        item: ReadItem,
        info: StorageInfo,
        target: torch.Tensor,
        batch: ReadBatch,
    ) -> torch.Tensor | None:
        """Adds to `batch` the read of the smallest byte range of the stored chunk that
        covers the requested box: into host memory, or for a target on a staged device (CUDA)
        into device memory through the pinned ring. Returns the staging view to copy from, or
        None when the bytes go straight into `target`."""
        dtype = _dtype(path, info.dtype)
        shape = tuple(info.shape or ())
        offsets, lengths = tuple(item.storage_offsets), tuple(item.lengths)
        if len(offsets) != len(shape) or len(lengths) != len(shape):
            raise CheckpointError(
                f"{path}: request for {item.storage_index.fqn!r} has {len(offsets)} dims, "
                f"the stored chunk {len(shape)}"
            )
        if any(
            o < 0 or n < 0 or o + n > d for o, n, d in zip(offsets, lengths, shape, strict=True)
        ):
            raise CheckpointError(
                f"{path}: request {offsets}+{lengths} for {item.storage_index.fqn!r} lies "
                f"outside the stored chunk {shape}"
            )
        if tuple(target.shape) != lengths:
            raise CheckpointError(
                f"{path}: {item.storage_index.fqn!r}: the destination has shape "
                f"{tuple(target.shape)}, the request {lengths}"
            )
        itemsize = dtype.itemsize
        numel = 1
        for d in shape:
            numel *= d
        if numel * itemsize != info.length:
            raise CheckpointError(
                f"{path}: {item.storage_index.fqn!r}: {info.length} bytes stored for a "
                f"{dtype} chunk of shape {shape}"
            )
        strides = contiguous_strides(shape)
        count = 1
        for n in lengths:
            count *= n
        if count == 0:
            return None
        first = sum(o * s for o, s in zip(offsets, strides, strict=True))
        last = sum((o + n - 1) * s for o, n, s in zip(offsets, lengths, strides, strict=True))
        span = last - first + 1
        start = info.offset + first * itemsize
        direct = span == count and target.dtype == dtype and target.is_contiguous()
        if batch.stages(target.device):
            # Device memory the ring copies into: the target itself, or a span on the same
            # device that the box is then copied out of there.
            dest = target if direct else torch.empty(span, dtype=dtype, device=target.device)
            batch.to_device(start, span * itemsize, dest)
            return None if direct else dest.as_strided(lengths, strides)
        if direct and target.device.type == "cpu":
            batch.to_host(start, span * itemsize, target.data_ptr())
            return None
        staging = torch.empty(span, dtype=dtype)
        batch.to_host(start, span * itemsize, staging.data_ptr())
        return staging.as_strided(lengths, strides)

    def _decode_bytes(self, path: str, item: ReadItem, raw: bytes) -> bytes:
        if not self.weights_only:
            return raw
        try:
            value = serialization.load(io.BytesIO(raw), weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"{path}: byte item {item.storage_index.fqn!r} does not load weights-only "
                f"({type(e).__name__}: {e}); pass Reader(..., weights_only=False) only if "
                "you trust this checkpoint"
            ) from e
        out = io.BytesIO()
        serialization.torch_save(value, out)
        return out.getvalue()


class _WeightsOnlyBytes:
    """A LoadPlanner seen through the stock reader: byte items are decoded weights-only and
    re-encoded before the planner's own ``load_bytes`` sees them; the rest is forwarded."""

    def __init__(self, planner: LoadPlanner, reader: Reader) -> None:
        self._planner = planner
        self._reader = reader

    def load_bytes(self, item: ReadItem, value: io.BytesIO) -> None:
        data = self._reader._decode_bytes(self._reader.path, item, value.read())
        self._planner.load_bytes(item, io.BytesIO(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)


def _dtype(path: str, name: str | None) -> torch.dtype:
    dtype = getattr(torch, name, None) if name else None
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"{path}: unknown tensor dtype {name!r} in the metadata")
    return dtype


def _metadata_unpickler_class(base: Any) -> type:
    """`base` (pickle's C Unpickler, or its pure-Python one with a dict memo) refusing every
    global but DCP Metadata's own classes and plain torch values."""

    class _MetadataUnpickler(base):  # type: ignore[misc,valid-type]
        """Unpickles DCP Metadata, refusing every global but its own classes and plain torch
        values (dtypes, sizes, layouts, memory formats)."""

        _MODULES = ("torch.distributed.checkpoint.metadata", __name__)
        _BUILTINS = frozenset({"set", "frozenset", "slice", "complex"})
        # Plain data classes a stock FileSystemWriter's metadata holds (read, then refused by
        # set_up_storage_reader with a clear message), and the paths it stores as checkpoint ids.
        _CLASSES = frozenset(
            {
                ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                ("pathlib", "PosixPath"),
                ("pathlib", "PurePosixPath"),
            }
        )

        def __init__(self, f: Any, name: str) -> None:
            super().__init__(f)
            self.name = name

        def find_class(self, module: str, name: str) -> Any:
            if module in self._MODULES:
                value = super().find_class(module, name)
                if isinstance(value, type):
                    return value
            elif module == "torch":
                value = getattr(torch, name, None)
                if value is torch.Size or isinstance(
                    value, (torch.dtype, torch.layout, torch.memory_format)
                ):
                    return value
            elif (module, name) in self._CLASSES:
                return super().find_class(module, name)
            elif module == "torch.serialization" and name == "_get_layout":
                return torch.serialization._get_layout  # layout by name, as torch pickles it
            elif module == "collections" and name == "OrderedDict":
                return super().find_class(module, name)
            elif module == "builtins" and name in self._BUILTINS:
                return super().find_class(module, name)
            raise CheckpointError(
                f"{self.name}: the metadata refers to {module}.{name}, which a DCP metadata file "
                "never needs; refusing to load it"
            )

    return _MetadataUnpickler


_MetadataUnpickler = _metadata_unpickler_class(pickle.Unpickler)
_DictMemoMetadataUnpickler = _metadata_unpickler_class(pickle._Unpickler)


def _unpickle_metadata(data: bytes, path: str) -> Any:
    """The object pickled in a .metadata file's bytes, pre-scanned first
    (_core.pickling.scan_pickle: lengths, truncation), with a dict memo where a memo index is
    past the pickle's size (CPython's C unpickler would allocate an array by it; see
    docs/format.md)."""
    try:
        scan = _core.pickling.scan_pickle(data, False)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    dict_memo = needs_dict_memo(scan, len(data))
    cls = _DictMemoMetadataUnpickler if dict_memo else _MetadataUnpickler
    return cls(io.BytesIO(data), path).load()
