"""Load side: unpickles data.pkl and materializes its storages.

Two unpicklers share one storage loader:

* weights-only (the default): CPython's C unpickler whose ``find_class`` resolves only what
  torch's ``weights_only=True`` allows (torch's own allowlist plus
  ``torch.serialization.add_safe_globals``); every other global is refused before it is
  imported, so no code from the file runs.
* full (``weights_only=False``): ``pickle_module.Unpickler`` as torch uses it.

Storages resolve by key, so sharing and views come back exactly as torch rebuilds them. Eager
CPU loads allocate every storage while unpickling and fill them all afterwards in one parallel
read (the GIL released). That is safe because the functions that rebuild plain tensors never
read storage data. The first global outside that known set (a user class, a quantized-tensor
rebuild...) makes the loader flush what is pending and read each later storage as soon as it
is created, so such code always sees real data.
"""

from __future__ import annotations

import _compat_pickle
import array
import pickle
from typing import Any, Callable

import torch

from . import _core
from ._archive import ArchiveReader
from .errors import CheckpointError, UnsafeGlobalError
from .settings import get_options

__all__ = ["StorageLoader", "make_unpickler", "scan_pickle"]

# Storages below this size share one host block per load (see StorageLoader._host_storage).
_SMALL_STORAGE_BYTES = 1 << 20

# Globals that rebuild objects without reading storage data (non-callables such as dtypes are
# always harmless and are not listed).
_DATA_BLIND = frozenset(
    {
        "collections.OrderedDict",
        "collections.Counter",
        "builtins.set",
        "builtins.complex",
        "builtins.bytearray",
        "_codecs.encode",
        "torch.Size",
        "torch.device",
        "torch.nn.parameter.Parameter",
        "torch.Tensor",
        "torch.storage.UntypedStorage",
        "torch.serialization._get_layout",
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch._utils._rebuild_meta_tensor_no_storage",
        "torch._tensor._rebuild_from_type_v2",
    }
)


# Modules torch's weights-only loader never resolves, even when allowlisted.
_BLOCKED_MODULES = frozenset({"sys", "os", "posix", "nt"})


def _allowed_globals() -> dict[str, Any]:
    from torch import _weights_only_unpickler as wou

    allowed = dict(wou._get_allowed_globals())
    allowed.update(wou._get_user_allowed_globals())
    return allowed


def _fix_import(module: str, name: str) -> tuple[str, str]:
    # Protocol-2 pickles name Python 3 builtins by their Python 2 paths (__builtin__.set).
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _restore_identity(map_location: Any, location: str) -> bool | None:
    """True if restoring a CPU storage saved at `location` returns it unchanged, False if it
    moves it, None if only calling map_location can tell."""
    if map_location is None:
        target = location
    elif isinstance(map_location, dict):
        target = map_location.get(location, location)
    elif isinstance(map_location, (str, bytes)):
        target = map_location.decode() if isinstance(map_location, bytes) else map_location
    elif isinstance(map_location, torch.device):
        target = str(map_location)
    else:
        return None
    return target == "cpu"


def _is_meta(map_location: Any) -> bool:
    if isinstance(map_location, (str, bytes)):
        loc = map_location.decode() if isinstance(map_location, bytes) else map_location
        return loc == "meta"
    return isinstance(map_location, torch.device) and map_location.type == "meta"


class StorageLoader:
    """Creates storages for persistent ids, reading them eagerly, lazily or from a mapping."""

    def __init__(
        self,
        archive: ArchiveReader,
        map_location: Any,
        mapping: _core.Mapping | None = None,
    ) -> None:
        from torch.serialization import _get_restore_location

        self.archive = archive
        self.map_location = map_location
        self.restore_location: Callable[[Any, str], Any] = _get_restore_location(map_location)
        self.mapping = mapping
        self.is_meta = _is_meta(map_location)
        self.loaded: dict[str, torch.storage.TypedStorage] = {}
        self.pending = array.array("Q")
        self.deferred = True  # until a data-reading global appears
        self._arena: _core.HostBuffer | None = None
        self._arena_offsets: dict[str, int] = {}
        self.location_error: BaseException | None = None  # raised by restore_location

    # -- persistent ids --------------------------------------------------------------------
    def persistent_load(self, saved_id: Any) -> torch.storage.TypedStorage:
        if not isinstance(saved_id, tuple) or len(saved_id) != 5:
            raise CheckpointError(
                f"{self.archive.name}: unsupported persistent id {saved_id!r:.80}; expected "
                "('storage', type, key, location, numel)"
            )
        typename, storage_type, key, location, numel = saved_id
        typename, key, location = (_ascii(typename), _ascii(key), _ascii(location))
        if typename != "storage" or not isinstance(key, str) or not isinstance(location, str):
            raise CheckpointError(f"{self.archive.name}: malformed storage id {saved_id!r:.80}")
        if storage_type is torch.UntypedStorage:
            dtype = torch.uint8
        else:
            declared: Any = getattr(storage_type, "dtype", None)
            if not isinstance(declared, torch.dtype):
                raise CheckpointError(
                    f"{self.archive.name}: storage {key!r} has no storage type "
                    f"({storage_type!r:.60})"
                )
            dtype = declared
        if type(numel) is not int or numel < 0:
            raise CheckpointError(
                f"{self.archive.name}: storage {key!r} has an invalid element count {numel!r:.40}"
            )
        cached = self.loaded.get(key)
        if cached is not None:
            return cached
        nbytes = numel * torch._utils._element_size(dtype)
        storage = self._storage(dtype, nbytes, key, location)
        typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
        if typed._data_ptr() != 0:  # as torch: empty storages are not shared
            self.loaded[key] = typed
        return typed

    def _storage(self, dtype: torch.dtype, nbytes: int, key: str, location: str) -> Any:
        if self.is_meta:
            return torch.UntypedStorage(nbytes, device="meta")
        rec = self.archive.record(f"data/{key}")
        if rec.size < nbytes:
            raise CheckpointError(
                f"{self.archive.name}: record data/{key} holds {rec.size} bytes but its storage "
                f"needs {nbytes}"
            )
        identity = _restore_identity(self.map_location, location)
        if self.mapping is not None:
            storage = self._mapped(rec.data_offset, nbytes)
        else:
            storage = self._host_storage(key, nbytes, rec.size)
            if nbytes:
                self.pending.extend((rec.data_offset, nbytes, storage.data_ptr()))
            if not (self.deferred and identity is True):
                self.flush()  # the data must be there before map_location or user code sees it
        if identity is True:
            return storage
        try:
            return self.restore_location(storage, location)
        except Exception as e:
            # A map_location callable is user code: its exceptions go out as they are. torch's
            # own restore failing (a location naming no device, or a device this machine
            # lacks, such as CUDA) becomes a CheckpointError (a RuntimeError, as torch's)
            # carrying torch's message.
            if callable(self.map_location) and not isinstance(
                self.map_location, (str, bytes, dict, torch.device)
            ):
                self.location_error = e
            raise

    def _mapped(self, offset: int, nbytes: int) -> torch.UntypedStorage:
        if nbytes == 0:
            return torch.UntypedStorage(0)
        # The tensor keeps the Mapping object (and so the mapping) alive.
        return torch.frombuffer(
            self.mapping, dtype=torch.uint8, count=nbytes, offset=offset
        ).untyped_storage()

    def _host_storage(self, key: str, nbytes: int, record_size: int) -> torch.UntypedStorage:
        """A fresh, non-resizable CPU storage (as torch.load's) in memory ckptio allocates.

        Large storages get a block each, huge-page backed, so first-touch page faults do not
        dominate the load, and each is freed with its tensors. Small ones are carved from one
        block per load (sized from the archive's records): one allocation and one run of huge
        pages instead of thousands of malloc'd fragments; that block is freed with the last of
        them.
        """
        if nbytes == 0:
            return torch.UntypedStorage(0)
        if record_size < _SMALL_STORAGE_BYTES:
            if self._arena is None:
                self._arena, self._arena_offsets = _plan_arena(self.archive)
            buffer: Any = self._arena
            offset = self._arena_offsets[key]
        else:
            buffer, offset = _core.HostBuffer(nbytes, get_options().huge_pages), 0
        return torch.frombuffer(
            buffer, dtype=torch.uint8, count=nbytes, offset=offset
        ).untyped_storage()

    # -- scheduling ------------------------------------------------------------------------
    def note_global(self, full_name: str, obj: Any) -> None:
        """Called for each global the pickle names: one that might read storage data ends the
        deferral of reads."""
        if self.deferred and callable(obj) and full_name not in _DATA_BLIND:
            self.flush()
            self.deferred = False

    def flush(self) -> None:
        """Reads every pending storage (one parallel batch, GIL released)."""
        if self.pending:
            pending, self.pending = self.pending, array.array("Q")
            self.archive.read_many(pending)


def _plan_arena(archive: ArchiveReader) -> tuple[_core.HostBuffer, dict[str, int]]:
    offsets: dict[str, int] = {}
    total = 0
    for name, rec in archive.records.items():
        if name.startswith("data/") and rec.size < _SMALL_STORAGE_BYTES:
            offsets[name[5:]] = total
            total += (rec.size + 63) & ~63  # 64-byte aligned, as torch's CPU allocator
    return _core.HostBuffer(max(total, 1), get_options().huge_pages), offsets


def _check_geometry(
    name: str, storage: Any, offset: Any, size: Any, stride: Any, dtype: Any
) -> None:
    """Refuses a tensor that does not fit in its storage, before torch sees it: a hostile
    size or stride must not make torch grow a storage or read outside it."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise CheckpointError(
            f"{name}: a tensor is rebuilt from {type(storage).__name__}, not a storage"
        )
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"{name}: tensor dtype {dtype!r:.40} is not a torch.dtype")
    element_size = dtype.itemsize
    last = offset
    ok = (
        type(offset) is int
        and offset >= 0
        and isinstance(size, (tuple, list))
        and isinstance(stride, (tuple, list))
        and len(size) == len(stride)
    )
    empty = False
    if ok:
        for n, step in zip(size, stride, strict=True):  # a plain loop: this runs once per tensor
            if type(n) is not int or type(step) is not int or n < 0 or step < 0:
                ok = False
                break
            empty = empty or n == 0
            last += (n - 1) * step
    if not ok:
        raise CheckpointError(
            f"{name}: invalid tensor geometry: offset {offset!r:.40}, size "
            f"{size!r:.80}, stride {stride!r:.80}"
        )
    if empty:
        return
    available = storage._untyped_storage.nbytes()
    if (last + 1) * element_size > available:
        raise CheckpointError(
            f"{name}: a tensor of size {tuple(size)} with stride {tuple(stride)} at offset "
            f"{offset} needs {(last + 1) * element_size} bytes; its storage has {available}"
        )


def _checked_rebuilds(name: str) -> dict[str, Callable[..., Any]]:
    """torch's tensor rebuild functions (torch/_utils.py), each preceded by a geometry check.

    They do what torch's do, minus the per-tensor fake-mode probe (about half of torch's
    per-tensor cost): load() hands loads under a FakeTensorMode to torch as a whole.
    """

    def build(storage: Any, storage_offset: Any, size: Any, stride: Any, dtype: Any) -> Any:
        _check_geometry(name, storage, storage_offset, size, stride, dtype)
        untyped = storage._untyped_storage
        t = torch.empty((0,), dtype=dtype, device=untyped.device)
        return t.set_(untyped, storage_offset, size, stride)

    def finish(t: Any, requires_grad: Any, backward_hooks: Any, metadata: Any) -> Any:
        t.requires_grad = requires_grad
        if metadata:
            torch._utils.set_tensor_metadata(t, metadata)
        t._backward_hooks = backward_hooks  # kept for backward compatibility, as torch does
        return t

    def rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> Any:
        return build(storage, storage_offset, size, stride, getattr(storage, "dtype", None))

    def rebuild_tensor_v2(
        storage: Any,
        storage_offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any,
        backward_hooks: Any,
        metadata: Any = None,
    ) -> Any:
        t = rebuild_tensor(storage, storage_offset, size, stride)
        return finish(t, requires_grad, backward_hooks, metadata)

    def rebuild_tensor_v3(
        storage: Any,
        storage_offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any,
        backward_hooks: Any,
        dtype: Any,
        metadata: Any = None,
    ) -> Any:
        t = build(storage, storage_offset, size, stride, dtype)
        return finish(t, requires_grad, backward_hooks, metadata)

    return {
        "torch._utils._rebuild_tensor": rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": rebuild_tensor_v3,
    }


# The deepest nesting of objects (and of open MARKs) a data.pkl may build; see docs/design.md.
MAX_PICKLE_DEPTH = 1000


def scan_pickle(name: str, data: bytes, *, weights_only: bool) -> None:
    """Checks data.pkl's opcodes before any unpickler runs (csrc/src/pickle_scan.cpp).

    Refuses memo indices, lengths and frames that the pickle cannot back (CPython's unpickler
    allocates by them before reading: a memory bomb), nesting deeper than MAX_PICKLE_DEPTH,
    truncation, and in weights-only mode every opcode torch's weights-only unpickler refuses.
    Linear in the pickle's size; it executes nothing.
    """
    try:
        _core.scan_pickle(data, weights_only, MAX_PICKLE_DEPTH)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: data.pkl: {e}") from None


def _ascii(value: Any) -> Any:
    return value.decode("ascii") if isinstance(value, bytes) else value


def _unsafe_global_message(full_path: str) -> str:
    return (
        f"Weights only load failed: the checkpoint names the global '{full_path}', which is not "
        "allowed by default. If you trust this class or function, allow it with "
        f"torch.serialization.add_safe_globals([{full_path}]) or the "
        f"torch.serialization.safe_globals([{full_path}]) context manager; if you trust the "
        "whole file, load it with weights_only=False (this can run arbitrary code)."
    )


def make_unpickler(
    data: Any,
    loader: StorageLoader,
    *,
    weights_only: bool,
    pickle_module: Any,
    **pickle_load_args: Any,
) -> Any:
    """An unpickler over `data` (a binary file object) wired to `loader`."""
    checked = _checked_rebuilds(loader.archive.name)
    if weights_only:
        allowed = {**_allowed_globals(), **checked}

        class _WeightsOnlyUnpickler(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                module, name = _fix_import(module, name)
                full = f"{module}.{name}"
                if module in _BLOCKED_MODULES:
                    raise UnsafeGlobalError(
                        f"Weights only load failed: the checkpoint names the global '{full}', "
                        f"whose module {module} is blocked; no allowlist can enable it."
                    )
                try:
                    obj = allowed[full]
                except KeyError:
                    raise UnsafeGlobalError(_unsafe_global_message(full)) from None
                loader.note_global(full, obj)
                return obj

            def persistent_load(self, pid: Any) -> Any:
                return loader.persistent_load(pid)

        return _WeightsOnlyUnpickler(data, encoding=pickle_load_args.get("encoding", "utf-8"))

    from torch.serialization import StorageType

    class _Unpickler(pickle_module.Unpickler):  # type: ignore[name-defined,misc]
        def find_class(self, module: str, name: str) -> Any:
            if type(name) is str and "Storage" in name:
                try:
                    return StorageType(name)
                except KeyError:
                    pass
            if module == "torch.tensor":  # renamed in torch 1.8 (pytorch#51633)
                module = "torch._tensor"
            full = f"{module}.{name}"
            obj = checked.get(full) or super().find_class(module, name)
            loader.note_global(full, obj)
            return obj

        def persistent_load(self, pid: Any) -> Any:
            return loader.persistent_load(pid)

    return _Unpickler(data, **pickle_load_args)
