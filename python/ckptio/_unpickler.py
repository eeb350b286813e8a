"""Load side: unpickles data.pkl and materializes its storages.

Two unpicklers share one storage loader:

* weights-only (the default): CPython's C unpickler whose ``find_class`` resolves only what
  torch's ``weights_only=True`` allows (torch's own allowlist plus
  ``torch.serialization.add_safe_globals``); every other global is refused before it is
  imported, so no code from the file runs.
* full (``weights_only=False``): ``pickle_module.Unpickler`` as torch uses it.

A pickle whose largest memo index is past its own size (a sparse memo numbering, or a memo
bomb: CPython's C unpickler allocates an array by that index) is unpickled by the same rules
on a pure-Python unpickler, whose memo is a dict (:func:`needs_dict_memo`).

Storages resolve by key, so sharing and views come back exactly as torch rebuilds them. Eager
CPU loads allocate every storage while unpickling and fill them in parallel reads (the GIL
released): the small ones on a background thread while unpickling goes on (overlap_reads),
the others in one batch afterwards. That is safe because the functions that rebuild plain
tensors never read storage data. The first global outside that known set (a user class, a
quantized-tensor rebuild...) makes the loader flush what is pending (waiting for the
background read) and read each later storage as soon as it is created, so such code always
sees real data. Storages that map_location sends to a CUDA device get their own device
allocation and are filled the same way, through the pinned staging ring of _staging.py.

The per-storage and per-tensor calls of the common case (a slice of the mapping or of the
block of small storages; a tensor over a CPU storage that cannot grow) are C callables
(csrc/bindings/register_unpickle.cpp) that hand everything else to the Python functions
here. load_into parses a file into TensorSpecs instead of tensors (unpickle_specs).
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import threading
import types
import weakref
from typing import Any, Callable, Protocol

import torch

from . import _core
from ._align import ALIGNMENT
from ._archive import ArchiveReader
from ._files import read_into
from ._placement import Placement
from ._reads import ReadBatch
from ._storage_types import typed_storage, typed_storage_direct
from ._util import gc_paused, is_environment_error, torch_load_state
from ._verify import checker_of
from .errors import CheckpointError, UnsafeGlobalError, unsafe_globals_message
from .settings import get_options

__all__ = [
    "NeedsTensors",
    "PlaceholderLoader",
    "StorageLoader",
    "StorageRef",
    "TensorSpec",
    "make_unpickler",
    "needs_dict_memo",
    "pickle_module_for",
    "refused_globals_error",
    "scan_pickle",
    "unpickle_placeholders",
    "unpickle_specs",
]


# storage[a:b] without UntypedStorage.__getitem__'s Python wrapper (a meta check; these
# storages are never meta): a storage over the same memory that keeps its parent alive and,
# as torch.load's, cannot be resized.
_StorageBase: Any = torch._C.StorageBase
_slice: Callable[[torch.UntypedStorage, slice], torch.UntypedStorage] = _StorageBase.__getitem__

# Storages below this size share one host block per load (see StorageLoader._host_storage).
_SMALL_STORAGE_BYTES = 1 << 20
# Blocks of at least this size can be huge pages (host_memory maps its own from here up).
_HUGE_PAGE_BYTES = 2 << 20

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


class Records(Protocol):
    """What a StorageLoader reads storages from: a torch archive (ArchiveReader) or the
    tensors of a safetensors file. ``records`` maps ``data/<key>`` to (data offset, size,
    zip method); ``record(name)`` raises the error that says why a record cannot be used."""

    name: str
    source: Any
    records: dict[str, tuple[int, int, int]]

    def record(self, name: str) -> Any: ...


class StorageLoader:
    """Creates storages for persistent ids, reading them eagerly, lazily or from a mapping."""

    def __init__(
        self,
        archive: Records,
        map_location: Any,
        mapping: _core.io.Mapping | None = None,
        placement: Placement | None = None,
    ) -> None:
        self.archive = archive
        self.map_location = map_location
        # A load of several files (a model directory) shares one placement, and so one
        # staging target (ring) per device.
        self.placement = placement or Placement(map_location, archive.name)
        self.mapping = mapping
        self.is_meta = self.placement.is_meta
        self.loaded: dict[str, torch.storage.TypedStorage] = {}
        self.reads = ReadBatch(archive.source)  # storages waiting for the next flush
        self.deferred = True  # until a data-reading global appears
        self._arena: torch.UntypedStorage | None = None
        self._arena_offsets: dict[str, int] = {}
        # The background read of every small record into the arena (overlap_reads), and the
        # exception it ended with.
        self._prefetch: threading.Thread | None = None
        self._prefetch_error: BaseException | None = None
        self._mapped_file: torch.UntypedStorage | None = None  # the whole mapping
        self._storage_types: dict[Any, tuple[torch.dtype, int]] = {}
        # The exception on its way out, if one is, that is not the file's fault: raised by
        # ckptio's allocation, reads or placement of storages, or by a map_location callable.
        # The unpicklings let it out as it is (a CUDA out-of-memory error stays one).
        self.foreign_error: BaseException | None = None
        # The C persistent_load made by unpickler_hook(), held weakly: it holds this loader
        # (its fallback), and a cycle would keep every storage of the load alive until the
        # next full garbage collection.
        self._slicer: Callable[[], Any] = _no_slicer

    def unpickler_hook(self) -> Callable[[Any], Any]:
        """The persistent_load to give the unpickler: a C StorageSlicer over this loader's
        persistent_load, which it arms with the storage its slices come from once there is
        one (the mapping, or the block of small storages being read in the background),
        and disarms when reads stop being deferred. It handles the common case itself (a
        slice wrapped in a TypedStorage: one C call instead of five Python frames) and
        everything else through persistent_load."""
        if typed_storage is not typed_storage_direct:
            return self.persistent_load
        slicer = _core.pickling.StorageSlicer(
            self.persistent_load,
            self.archive.records,
            self._storage_types,
            {loc for loc in ("cpu",) if self.placement.keeps_on_cpu(loc) is True},
            self.loaded,
            _slice,
            _TypedStorage,
        )
        self._slicer = weakref.ref(slicer)
        return slicer  # type: ignore[no-any-return]

    def _arm_slicer(self, base: torch.UntypedStorage, offsets: dict[str, int] | None) -> None:
        slicer = self._slicer()
        if slicer is not None and self.deferred:
            slicer.offsets = offsets
            slicer.limit = _SMALL_STORAGE_BYTES
            slicer.base = base

    # -- persistent ids --------------------------------------------------------------------
    def persistent_load(self, saved_id: Any) -> torch.storage.TypedStorage:
        # Runs once per storage record (20,000 times for 20,000 small tensors): every lookup
        # that depends only on the storage type or the location is memoised.
        if type(saved_id) is not tuple or len(saved_id) != 5:
            raise CheckpointError(
                f"{self.archive.name}: unsupported persistent id {saved_id!r:.80}; expected "
                "('storage', type, key, location, numel)"
            )
        typename, storage_type, key, location, numel = saved_id
        if type(key) is not str or type(location) is not str:
            key, location = _ascii(key), _ascii(location)
        if (
            (typename != "storage" and _ascii(typename) != "storage")
            or not isinstance(key, str)
            or not isinstance(location, str)
        ):
            raise CheckpointError(f"{self.archive.name}: malformed storage id {saved_id!r:.80}")
        try:
            dtype, element_size = self._storage_types[storage_type]
        except (KeyError, TypeError):
            dtype, element_size = self._storage_type(key, storage_type)
        if type(numel) is not int or numel < 0:
            raise CheckpointError(
                f"{self.archive.name}: storage {key!r} has an invalid element count {numel!r:.40}"
            )
        cached = self.loaded.get(key)
        if cached is not None:
            return cached
        typed = self._wrap(self.storage(key, numel * element_size, location), dtype)
        if numel:  # as torch: empty storages are not shared
            self.loaded[key] = typed
        return typed

    def storage(self, key: str, nbytes: int, location: str) -> Any:
        """The storage of record data/`key` (`nbytes` bytes, saved at `location`), placed as
        map_location says: read now, queued for the next flush, or a view of the mapping.
        A failure that is not the file's is kept as foreign_error and goes out as it is."""
        try:
            return self._storage(nbytes, key, location)
        except CheckpointError:
            raise  # the file's records or locations
        except BaseException as e:
            self.foreign_error = e
            raise

    def _wrap(self, storage: Any, dtype: torch.dtype) -> Any:
        """What persistent_load returns for `storage` (what _storage made) of `dtype`."""
        return typed_storage(storage, dtype)

    def _storage_type(self, key: str, storage_type: Any) -> tuple[torch.dtype, int]:
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
        entry = (dtype, torch._utils._element_size(dtype))
        try:
            self._storage_types[storage_type] = entry
        except TypeError:  # unhashable: not memoised
            pass
        return entry

    def _storage(self, nbytes: int, key: str, location: str) -> Any:
        if self.is_meta:
            return torch.UntypedStorage(nbytes, device="meta")
        data_offset, record_size = self._record(key, nbytes)
        staged = self.placement.staged_target(location)
        if staged is not None:
            # Straight to the device through the pinned staging ring (_staging.py), mmap or
            # not: torch's result is the same device storage either way.
            memory = staged.allocate(nbytes)
            if nbytes:
                self.reads.to_target(staged, data_offset, nbytes, memory)
                if not self.deferred:
                    self.flush()
            return memory.untyped_storage()
        identity = self.placement.keeps_on_cpu(location)
        if self.mapping is not None:
            storage = self._mapped(data_offset, nbytes)
        else:
            storage = self._host_storage(key, nbytes, record_size)
            if nbytes and not (self._prefetch is not None and record_size < _SMALL_STORAGE_BYTES):
                self.reads.to_host(data_offset, nbytes, storage.data_ptr())
            if not (self.deferred and identity is True):
                self.flush()  # the data must be there before map_location or user code sees it
        if identity is True:
            return storage
        return self.placement.restore(storage, location)

    def _record(self, key: str, nbytes: int) -> tuple[int, int]:
        """(data offset, size) of the stored record data/<key> of a storage of `nbytes`."""
        data_offset, record_size, method = self.archive.records.get("data/" + key, (0, 0, 1))
        if method != 0:
            self.archive.record(f"data/{key}")  # raises the error that names the problem
        if record_size != nbytes:
            # torch.load refuses a record whose size differs from its storage's (numel x
            # element size) in either direction; a larger record would load another tensor.
            raise CheckpointError(
                f"{self.archive.name}: record data/{key} holds {record_size} bytes but its "
                f"storage needs {nbytes} (numel x element size; they must be equal)"
            )
        return data_offset, record_size

    def _mapped(self, offset: int, nbytes: int) -> torch.UntypedStorage:
        if nbytes == 0:
            return _empty_storage()
        if self._mapped_file is None:
            # One storage over the whole mapping; each tensor's storage is a slice of it (one
            # C call), which keeps it and through it the Mapping object (and so the mapping)
            # alive.
            self._mapped_file = torch.frombuffer(
                memoryview(self.mapping),  # type: ignore[arg-type]
                dtype=torch.uint8,
            ).untyped_storage()
            self._arm_slicer(self._mapped_file, None)
        return _slice(self._mapped_file, slice(offset, offset + nbytes))

    def _host_storage(self, key: str, nbytes: int, record_size: int) -> torch.UntypedStorage:
        """A fresh, non-resizable CPU storage (as torch.load's).

        Large storages get their own block (:func:`host_memory`), freed (or kept for the next
        load, settings ``recycle_memory``) with its tensors. Small ones are slices of one block
        per load (sized from the archive's records, :func:`_plan_arena`): one allocation and
        one run of huge pages instead of thousands of malloc'd fragments; that block is freed
        (or kept) with the last of them.
        """
        if nbytes == 0:
            return _empty_storage()
        if record_size < _SMALL_STORAGE_BYTES:
            arena = self._arena
            if arena is None:
                arena, self._arena_offsets, requests = _plan_arena(self.archive)
                self._arena = arena
                # A remote object's small records are read with the big ones instead: one
                # plan merges neighbours into few large GETs, where a batch of their own
                # would cost a GET (a round trip, a request's CPU) for nearly each.
                from ._remote import RemoteSource

                remote = isinstance(self.archive.source, RemoteSource)
                if self.deferred and get_options().overlap_reads and not remote:
                    self._start_prefetch(arena, requests)
                    self._arm_slicer(arena, self._arena_offsets)
            offset = self._arena_offsets[key]
            return _slice(arena, slice(offset, offset + nbytes))
        return host_memory(nbytes)

    def _start_prefetch(self, arena: torch.UntypedStorage, requests: Any) -> None:
        """Starts reading every small stored record into its arena slot (`requests`, relative
        to the arena's address) on a background thread (the GIL released while it reads), so
        the read overlaps the unpickling.

        Records the pickle never names are read too (their slots exist anyway): one batch in
        file order instead of one request per storage as they are met. flush() waits for it,
        so nothing sees a storage before its data is there.
        """
        if not len(requests):
            return
        opts = get_options()  # the caller's (thread-local) options, not the reader thread's
        source = self.archive.source

        def run() -> None:
            try:
                read_into(source, requests, arena.data_ptr(), opts)
            except BaseException as e:  # re-raised by flush() in the loading thread
                self._prefetch_error = e

        # The closure holds the arena and the source: both outlive the read even if the load
        # fails and drops them first.
        thread = threading.Thread(target=run, name="ckptio-prefetch", daemon=True)
        thread.start()
        self._prefetch = thread

    def wait_prefetch(self) -> None:
        """Waits for the background read (if any) and raises what it raised."""
        if self._prefetch is not None:
            self._prefetch.join()
            error, self._prefetch_error = self._prefetch_error, None
            if error is not None:
                raise error

    def join_prefetch(self) -> None:
        """Waits for the background read without raising: for paths already failing, so no
        read outlives the load."""
        if self._prefetch is not None:
            self._prefetch.join()

    # -- scheduling ------------------------------------------------------------------------
    def note_global(self, full_name: str, obj: Any) -> None:
        """Called for each global the pickle names: one that might read storage data ends the
        deferral of reads."""
        if self.deferred and callable(obj) and full_name not in _DATA_BLIND:
            slicer = self._slicer()
            if slicer is not None:
                slicer.base = None  # from now on every storage goes through _storage
            self.flush()
            self.deferred = False

    def flush(self) -> None:
        """Reads every pending storage (one parallel batch, GIL released). Every record was
        checked against the file before it was queued: a failure here is ckptio's or the
        machine's, kept as foreign_error."""
        try:
            self._flush()
        except CheckpointError:
            raise
        except BaseException as e:
            self.foreign_error = e
            raise

    def _flush(self) -> None:
        self.wait_prefetch()
        self.reads.run()  # host memory in one batch; device memory through the load's rings
        if self.mapping is not None:
            checker = checker_of(self.archive.source)
            if checker is not None:  # verify: every data record of the mapping, once
                checker.check_mapping(self.mapping)


def _no_slicer() -> None:
    return None


def _plan_arena(archive: Records) -> tuple[torch.UntypedStorage, dict[str, int], Any]:
    """The block of a load's small storages (64-byte aligned slots, as torch's CPU allocator
    aligns), each small record's slot, and the reads that fill the block: (file offset, size,
    slot) uint64 triples, relative to the block's address."""
    total, offsets, requests = _core.pickling.plan_arena(
        archive.records, _SMALL_STORAGE_BYTES, ALIGNMENT
    )
    return host_memory(max(total, 1)), offsets, memoryview(requests).cast("Q")


def _empty_storage() -> torch.UntypedStorage:
    # Non-resizable, as torch.load's empty storages (a fresh one each: they are not shared).
    return _slice(torch.UntypedStorage(0), slice(0, 0))


def host_memory(nbytes: int) -> torch.UntypedStorage:
    """`nbytes` of uninitialized host memory as a non-resizable storage (as torch.load's),
    advised for transparent huge pages before first touch (settings ``huge_pages``), where
    first-touch 4 KiB page faults cost more than the copy (docs/design.md, Load, step 3).

    From :data:`_HUGE_PAGE_BYTES` up, with ``recycle_memory`` on: a mapping of ckptio's own
    (``_core.io.HostBuffer``, owned by the storage through ``torch.frombuffer``), 2 MiB-aligned,
    that once freed is kept for the next block of its size, so an eager load in a loop
    reuses memory already faulted in (``recycle_max_bytes`` bounds what is kept). glibc does
    that for torch.load's tensors of up to 32 MiB only, and when torch.load between two
    loads has not rearranged its heap. Otherwise a block of torch's CPU allocator.
    """
    opts = get_options()
    if opts.recycle_memory and opts.recycle_max_bytes and nbytes >= _HUGE_PAGE_BYTES:
        try:
            buffer = _core.io.HostBuffer(
                nbytes, opts.huge_pages, opts.recycle_max_bytes, opts.recycle_idle_seconds
            )
        except MemoryError:
            pass
        else:
            mapped = torch.frombuffer(buffer, dtype=torch.uint8)  # type: ignore[call-overload]
            return _slice(mapped.untyped_storage(), slice(0, nbytes))
    owner = torch.empty(nbytes, dtype=torch.uint8).untyped_storage()
    if opts.huge_pages:
        _core.io.advise_huge_pages(owner.data_ptr(), nbytes)
    return _slice(owner, slice(0, nbytes))  # same memory, not resizable


def _check_geometry(
    name: str, storage: Any, offset: Any, size: Any, stride: Any, dtype: Any
) -> torch.UntypedStorage:
    """Refuses a tensor that does not fit in its storage, before torch sees it: a hostile
    size or stride must not make torch grow a storage or read outside it. Returns the
    untyped storage."""
    if type(storage) is not _TypedStorage and not isinstance(storage, _TypedStorage):
        raise CheckpointError(
            f"{name}: a tensor is rebuilt from {type(storage).__name__}, not a storage"
        )
    untyped: torch.UntypedStorage = storage._untyped_storage
    _check_fits(name, offset, size, stride, dtype, untyped.nbytes())
    return untyped


def _check_fits(name: str, offset: Any, size: Any, stride: Any, dtype: Any, nbytes: int) -> None:
    """Refuses a geometry that is malformed or, for a tensor with elements, reaches past the
    `nbytes` of its storage."""
    if type(dtype) is not torch.dtype:
        raise CheckpointError(f"{name}: tensor dtype {dtype!r:.40} is not a torch.dtype")
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
            if n == 0:
                empty = True
            last += (n - 1) * step
    if not ok:
        raise CheckpointError(
            f"{name}: invalid tensor geometry: offset {offset!r:.40}, size "
            f"{size!r:.80}, stride {stride!r:.80}"
        )
    if empty:
        return
    if (last + 1) * dtype.itemsize > nbytes:
        raise CheckpointError(
            f"{name}: a tensor of size {tuple(size)} with stride {tuple(stride)} at offset "
            f"{offset} needs {(last + 1) * dtype.itemsize} bytes; its storage has {nbytes}"
        )


def _checked_rebuilds(name: str) -> dict[str, Callable[..., Any]]:
    """torch's tensor rebuild functions (torch/_utils.py), each preceded by a geometry check.

    They do what torch's do, minus the per-tensor fake-mode probe (about half of torch's
    per-tensor cost): load() hands loads under a FakeTensorMode to torch as a whole.
    """
    empty = torch.empty
    set_metadata = torch._utils.set_tensor_metadata

    def build(storage: Any, storage_offset: Any, size: Any, stride: Any, dtype: Any) -> Any:
        # set_ refuses every geometry that does not fit a non-resizable storage (what the
        # loaders make for data: slices of one block or of the mapping), so the check in
        # Python runs only where torch would grow the storage instead (meta placeholders and
        # device storages), and after a refusal, to say what was wrong.
        if type(storage) is _TypedStorage:
            untyped = storage._untyped_storage
            if untyped.resizable():
                _check_geometry(name, storage, storage_offset, size, stride, dtype)
        else:
            untyped = _check_geometry(name, storage, storage_offset, size, stride, dtype)
        try:
            return empty((0,), dtype=dtype, device=untyped.device).set_(
                untyped, storage_offset, size, stride
            )
        except Exception as e:
            if is_environment_error(e):
                raise
            _check_geometry(name, storage, storage_offset, size, stride, dtype)
            raise CheckpointError(f"{name}: a tensor could not be rebuilt: {e}") from None

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
        t = build(storage, storage_offset, size, stride, getattr(storage, "dtype", None))
        t.requires_grad = requires_grad
        if metadata:
            set_metadata(t, metadata)
        t._backward_hooks = backward_hooks  # kept for backward compatibility, as torch does
        return t

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
        t.requires_grad = requires_grad
        if metadata:
            set_metadata(t, metadata)
        t._backward_hooks = backward_hooks
        return t

    return {
        "torch._utils._rebuild_tensor": rebuild_tensor,
        # In C for storages that cannot grow (what the loaders make for data); others, and
        # every failure, go to the Python function above.
        "torch._utils._rebuild_tensor_v2": _core.pickling.fast_rebuild_v2(
            rebuild_tensor_v2,
            _TypedStorage,
            torch.UntypedStorage,
            _empty_of,
            set_metadata,
            torch.device("cpu"),
        ),
        "torch._utils._rebuild_tensor_v3": rebuild_tensor_v3,
    }


_TypedStorage = torch.storage.TypedStorage


def _empty_of(dtype: torch.dtype) -> torch.Tensor:
    return torch.empty((0,), dtype=dtype)


def scan_pickle(
    name: str, data: bytes | memoryview, *, weights_only: bool
) -> _core.pickling.PickleScan:
    """Checks data.pkl's opcodes before any unpickler runs (csrc/src/pickle_scan.cpp).

    Refuses lengths and frames that run past the pickle (CPython's unpickler allocates by
    them before reading: a memory bomb), GETs of indices never stored, truncation, and in
    weights-only mode every opcode torch's weights-only unpickler refuses; never a pickle
    CPython's unpickler accepts. Linear in the pickle's size; it executes nothing. The scan's
    ``memo_size`` says whether the pickle needs a dict memo (:func:`needs_dict_memo`).
    """
    try:
        return _core.pickling.scan_pickle(data, weights_only)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: data.pkl: {e}") from None


# CPython's C unpickler keeps its memo in an array that it grows to twice the largest index
# stored (8 bytes a slot), and fills: a LONG_BINPUT 0x7fffffff in a 9-byte pickle asks for
# 32 GiB. An unpickler that may be that one (a user's pickle_module whose Unpickler is neither
# pickle's nor a pure-Python one) is refused a pickle whose array would pass this size while
# the pickle does not justify it (docs/format.md, "Pre-scan limits").
MEMO_ARRAY_LIMIT = 1 << 30
_MEMO_SLOT_BYTES = 16  # 8-byte pointers, grown to twice the index


def needs_dict_memo(scan: _core.pickling.PickleScan, size: int) -> bool:
    """Whether the pickle of `size` bytes that `scan` saw stores a memo index past its size:
    CPython's C unpickler would allocate an array the file does not justify (every pickler
    numbers its stores below the pickle's size), so it is unpickled with a dict memo instead
    (pickle._Unpickler, torch's weights-only unpickler), bounded by the file."""
    return scan.memo_size > size


def _check_memo_array(memo_size: int, unpickler: Any, name: str) -> None:
    """Refuses (CheckpointError) a pickle storing memo index `memo_size - 1` for `unpickler`,
    whose memo may be CPython's C array, when that array would pass MEMO_ARRAY_LIMIT."""
    if memo_size * _MEMO_SLOT_BYTES > MEMO_ARRAY_LIMIT:
        raise CheckpointError(
            f"{name}: the pickle stores memo index {memo_size - 1}, far past its size, and "
            f"pickle_module's unpickler ({getattr(unpickler, '__qualname__', unpickler)!r:.80}) "
            "may keep its memo in an array sized by it, as CPython's C unpickler does "
            f"({memo_size * _MEMO_SLOT_BYTES >> 20} MiB); with the default pickle_module "
            "ckptio unpickles it with a dict memo"
        )


def _dict_memo_base(unpickler: Any, memo_size: int, name: str) -> Any:
    """The unpickler class to use instead of `unpickler` for a pickle that needs a dict memo:
    pickle's pure-Python one for pickle's C one; a pure-Python one as it is; any other as it
    is unless its memo array could pass MEMO_ARRAY_LIMIT (CheckpointError)."""
    if unpickler is pickle.Unpickler:
        return pickle._Unpickler
    if not (isinstance(unpickler, type) and issubclass(unpickler, pickle._Unpickler)):
        _check_memo_array(memo_size, unpickler, name)
    return unpickler


def _dict_memo_pickle() -> Any:
    """The `pickle` module with its pure-Python (dict-memo) Unpickler, load and loads."""
    module = types.ModuleType("pickle", pickle.__doc__)
    module.__dict__.update({k: v for k, v in vars(pickle).items() if not k.startswith("__")})
    module.Unpickler = pickle._Unpickler  # type: ignore[attr-defined]
    module.load = pickle._load  # type: ignore[attr-defined]
    module.loads = pickle._loads  # type: ignore[attr-defined]
    return module


_DICT_MEMO_PICKLE = _dict_memo_pickle()


def pickle_module_for(
    pickle_module: Any, scans: list[tuple[_core.pickling.PickleScan, int]], name: str
) -> Any:
    """The pickle_module to hand torch.load for the pickles it will read, scanned as `scans`
    ((scan, size) each): `pickle_module` itself unless one of them needs a dict memo; then
    for `pickle`, the `pickle` module with its pure-Python Unpickler and load; a module whose
    Unpickler is pure-Python (and whose load is not pickle's C one) as it is; any other as it
    is unless its memo array could pass MEMO_ARRAY_LIMIT (CheckpointError). None (torch's
    weights-only unpickler, whose memo is a dict) stays None."""
    sparse = [scan.memo_size for scan, size in scans if needs_dict_memo(scan, size)]
    if pickle_module is None or not sparse:
        return pickle_module
    if pickle_module is pickle:
        return _DICT_MEMO_PICKLE
    unpickler = getattr(pickle_module, "Unpickler", None)
    pure = isinstance(unpickler, type) and issubclass(unpickler, pickle._Unpickler)
    if not pure or getattr(pickle_module, "load", None) is pickle.load:
        _check_memo_array(max(sparse), unpickler, name)
    return pickle_module


def _ascii(value: Any) -> Any:
    return value.decode("ascii") if isinstance(value, bytes) else value


def unsafe_globals(
    data: bytes | memoryview, allowed: dict[str, Any] | None = None, *, weights_only: bool = True
) -> tuple[list[str], list[str], list[str]]:
    """(needed, lacking, blocked): every global the pickle `data` names (GLOBAL, INST,
    STACK_GLOBAL; Python 2 paths mapped as the unpickler maps them), found by the pre-scan
    without running anything; those the weights-only allowlist (`allowed`, default torch's
    plus add_safe_globals) lacks, blocked ones included; and those whose module is blocked."""
    allowed = _allowed_globals() if allowed is None else allowed
    needed: list[str] = []
    for module, name in _core.pickling.pickle_globals(data, weights_only):
        full = ".".join(_fix_import(module, name))
        if full not in needed:
            needed.append(full)
    blocked = [g for g in needed if g.rpartition(".")[0] in _BLOCKED_MODULES]
    lacking = [g for g in needed if g in blocked or g not in allowed]
    return needed, lacking, blocked


def _refusal(data: bytes | None, full: str, allowed: dict[str, Any]) -> UnsafeGlobalError:
    """The error for the refused global `full`, naming every other global of `data` the
    allowlist lacks as well (when the pre-scan can list them)."""
    lacking, blocked = [full], [full] if full.rpartition(".")[0] in _BLOCKED_MODULES else []
    if data is not None:
        try:
            _, found, found_blocked = unsafe_globals(data, allowed, weights_only=False)
        except CheckpointError:
            found, found_blocked = [], []
        if full in found:
            lacking, blocked = found, found_blocked
    return UnsafeGlobalError(unsafe_globals_message(lacking, blocked), lacking, blocked)


def refused_globals_error(pickles: list[bytes | memoryview]) -> UnsafeGlobalError | None:
    """The UnsafeGlobalError naming every global of `pickles` the weights-only allowlist
    lacks, for a refusal by torch's own weights-only loader (legacy and delegated files), or
    None when the pre-scan finds none (torch refused something else)."""
    allowed = _allowed_globals()
    lacking: list[str] = []
    blocked: list[str] = []
    for data in pickles:
        try:
            _, found, found_blocked = unsafe_globals(data, allowed, weights_only=False)
        except CheckpointError:
            return None
        lacking += [g for g in found if g not in lacking]
        blocked += [g for g in found_blocked if g not in blocked]
    if not lacking:
        return None
    return UnsafeGlobalError(unsafe_globals_message(lacking, blocked), lacking, blocked)


def _weights_only_unpickler(base: Any) -> type:
    """`base` (pickle's C Unpickler, or its pure-Python one with a dict memo) resolving only
    allowlisted globals."""

    class _WeightsOnlyUnpickler(base):  # type: ignore[misc,valid-type]
        def __init__(
            self,
            data: Any,
            loader: StorageLoader,
            allowed: dict[str, Any],
            encoding: str,
            pickle_bytes: bytes | None = None,
        ) -> None:
            super().__init__(data, encoding=encoding)
            self._loader = loader
            self._allowed = allowed
            self._pickle_bytes = pickle_bytes  # to list every lacking global when one is refused
            self.persistent_load = loader.unpickler_hook()

        def find_class(self, module: str, name: str) -> Any:
            module, name = _fix_import(module, name)
            full = f"{module}.{name}"
            if module in _BLOCKED_MODULES:
                raise _refusal(self._pickle_bytes, full, self._allowed)
            try:
                obj = self._allowed[full]
            except KeyError:
                raise _refusal(self._pickle_bytes, full, self._allowed) from None
            self._loader.note_global(full, obj)
            return obj

    return _WeightsOnlyUnpickler


# Made once, not per load: a class made per load is a reference cycle that would keep the
# loader, and through it every storage of the load, alive until the next full collection.
_WeightsOnlyUnpickler = _weights_only_unpickler(pickle.Unpickler)
_DictMemoWeightsOnlyUnpickler = _weights_only_unpickler(pickle._Unpickler)


def _full_unpickler_class(base: Any) -> type:
    """`base` (a pickle_module's Unpickler) resolving torch's renamed and checked globals and
    reading storages through the loader."""
    cls = _FULL_UNPICKLERS.get(base)
    if cls is not None:
        return cls
    from torch.serialization import StorageType

    class _Unpickler(base):  # type: ignore[misc,valid-type]
        _loader: StorageLoader
        _checked: dict[str, Callable[..., Any]]

        def find_class(self, module: str, name: str) -> Any:
            if type(name) is str and "Storage" in name:
                try:
                    return StorageType(name)
                except KeyError:
                    pass
            if module == "torch.tensor":  # renamed in torch 1.8 (pytorch#51633)
                module = "torch._tensor"
            full = f"{module}.{name}"
            obj = self._checked.get(full) or super().find_class(module, name)
            self._loader.note_global(full, obj)
            return obj

        def persistent_load(self, pid: Any) -> Any:
            return self._loader.persistent_load(pid)

    _FULL_UNPICKLERS[base] = _Unpickler
    return _Unpickler


_FULL_UNPICKLERS: weakref.WeakKeyDictionary[type, type] = weakref.WeakKeyDictionary()


class PlaceholderLoader(StorageLoader):
    """A storage loader that reads nothing, for parsing a file's structure (``ckptio.open``,
    ``load_into``, ``ckptio verify``): each storage is a ``meta`` storage of the right size,
    one per key (so ties survive), remembered with its key, saved location and the data
    offset of its record, whose size is checked against the storage's."""

    def __init__(self, archive: ArchiveReader) -> None:
        super().__init__(archive, "meta", None)
        #: id of each meta StorageImpl (``untyped_storage()._cdata``) -> (key, location,
        #: record data offset)
        self.placed: dict[int, tuple[str, str, int]] = {}
        self._made: list[torch.UntypedStorage] = []  # alive, so that those ids stay unique

    def unpickler_hook(self) -> Callable[[Any], Any]:
        return self.persistent_load  # nothing to slice

    def _storage(self, nbytes: int, key: str, location: str) -> Any:
        data_offset, _ = self._record(key, nbytes)
        storage = torch.UntypedStorage(nbytes, device="meta")
        self.placed[storage._cdata] = (key, location, data_offset)
        self._made.append(storage)
        return storage


def unpickle_placeholders(archive: ArchiveReader) -> tuple[Any, PlaceholderLoader]:
    """The object in `archive`'s data.pkl, unpickled weights-only over placeholder (meta)
    storages, and the loader that tells where each storage's bytes are."""
    loader = PlaceholderLoader(archive)
    unpickler = make_unpickler(
        archive.read("data.pkl"), loader, weights_only=True, pickle_module=None, encoding="utf-8"
    )
    return _load(unpickler, loader), loader


class NeedsTensors(Exception):
    """The pickle names a global that needs real tensor objects (a subclass, a parameter with
    state, a sparse or quantized rebuild...): :func:`unpickle_specs` cannot stand in for
    them."""


# A storage of the file, not read: StorageRef((data_offset, nbytes, dtype, itemsize)), what
# unpickle_specs hands to the rebuild functions; and a dense tensor of the file without a
# torch object: TensorSpec((data_offset, dtype, storage_offset, size, stride)), the file
# offset of its storage's first byte, its dtype and its geometry in elements (checked against
# its storage). Named tuples made in C (register_specs.cpp), which builds most of them.
StorageRef = _core.pickling.StorageRef
TensorSpec = _core.pickling.TensorSpec


# The globals that rebuild objects without reading storage data and also take no tensor (the
# others of _DATA_BLIND wrap or rebuild a tensor object): specs can stand in for the tensors
# around them, and the rebuild functions among them are replaced by _spec_rebuilds.
_SPEC_GLOBALS = _DATA_BLIND - {
    "torch.nn.parameter.Parameter",
    "torch.Tensor",
    "torch._utils._rebuild_parameter_with_state",
    "torch._utils._rebuild_meta_tensor_no_storage",
    "torch._tensor._rebuild_from_type_v2",
}


class SpecLoader(StorageLoader):
    """Storages as :class:`StorageRef` (nothing read or allocated), one per key (ties
    survive), for :func:`unpickle_specs`."""

    def __init__(self, archive: ArchiveReader) -> None:
        super().__init__(archive, "meta", None)

    def unpickler_hook(self) -> Callable[[Any], Any]:
        # The common case in C; the rest, and every failure, through persistent_load.
        return _core.pickling.spec_persistent_load(  # type: ignore[no-any-return]
            self.persistent_load, self.archive.records, self._storage_types, self.loaded
        )

    def _storage(self, nbytes: int, key: str, location: str) -> Any:
        return self._record(key, nbytes)

    def _wrap(self, storage: Any, dtype: torch.dtype) -> Any:
        data_offset, nbytes = storage
        return StorageRef((data_offset, nbytes, dtype, dtype.itemsize))

    def note_global(self, full_name: str, obj: Any) -> None:
        if callable(obj) and full_name not in _SPEC_GLOBALS:
            raise NeedsTensors(full_name)


def _spec_rebuilds(name: str) -> dict[str, Callable[..., Any]]:
    """torch's tensor rebuild functions over StorageRefs: each returns a TensorSpec."""

    def spec(storage: Any, offset: Any, size: Any, stride: Any, dtype: Any) -> TensorSpec:
        if type(storage) is not StorageRef:
            raise CheckpointError(
                f"{name}: a tensor is rebuilt from {type(storage).__name__}, not a storage"
            )
        _check_fits(name, offset, size, stride, dtype, storage.nbytes)
        return TensorSpec((storage.data_offset, dtype, offset, tuple(size), tuple(stride)))

    def rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> TensorSpec:
        return spec(storage, storage_offset, size, stride, getattr(storage, "dtype", None))

    def rebuild_tensor_v2(
        storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any
    ) -> TensorSpec:
        return spec(storage, storage_offset, size, stride, getattr(storage, "dtype", None))

    def rebuild_tensor_v3(
        storage: Any,
        storage_offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any,
        backward_hooks: Any,
        dtype: Any,
        *_: Any,
    ) -> TensorSpec:
        return spec(storage, storage_offset, size, stride, dtype)

    def rebuild_parameter(data: Any, *_: Any) -> TensorSpec:
        if type(data) is not TensorSpec:
            raise NeedsTensors("torch._utils._rebuild_parameter")
        return data

    return {
        "torch._utils._rebuild_tensor": rebuild_tensor,
        # In C for a StorageRef and a geometry that fits it; the rest, and every failure, in
        # the Python function above.
        "torch._utils._rebuild_tensor_v2": _core.pickling.spec_rebuild_v2(rebuild_tensor_v2),
        "torch._utils._rebuild_tensor_v3": rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": rebuild_parameter,
    }


def unpickle_specs(archive: ArchiveReader) -> Any:
    """The object in `archive`'s data.pkl with a :class:`TensorSpec` for each tensor, under
    the weights-only rules (a global they refuse raises UnsafeGlobalError as in load()).
    Raises NeedsTensors when the pickle needs real tensors: unpickle_placeholders then."""
    loader = SpecLoader(archive)
    unpickler = make_unpickler(
        archive.read("data.pkl"),
        loader,
        weights_only=True,
        pickle_module=None,
        rebuilds=_spec_rebuilds(archive.name),
        encoding="utf-8",
    )
    return _load(unpickler, loader)


def _load(unpickler: Any, loader: StorageLoader) -> Any:
    """unpickler.load() with the collector paused, for the weights-only parses of
    unpickle_placeholders and unpickle_specs, leaving torch's global state as it was (their
    tensors hold no data: nothing is queued for torch's sparse check). An unexpected
    exception that is not ckptio's or the machine's becomes a CheckpointError naming the
    file."""
    try:
        with torch_load_state(loader.map_location, validate=False), gc_paused():
            return unpickler.load()
    except (CheckpointError, NeedsTensors, KeyboardInterrupt):
        raise
    except Exception as e:
        if e is loader.foreign_error or is_environment_error(e):
            raise
        raise CheckpointError(
            f"{loader.archive.name}: data.pkl could not be unpickled: {type(e).__name__}: {e}"
        ) from e


def make_unpickler(
    pickle_bytes: bytes,
    loader: StorageLoader,
    *,
    weights_only: bool,
    pickle_module: Any,
    rebuilds: dict[str, Callable[..., Any]] | None = None,
    **pickle_load_args: Any,
) -> Any:
    """An unpickler over `pickle_bytes` (a data.pkl) wired to `loader`, resolving torch's
    tensor rebuild functions to `rebuilds` (default: the checked ones that build tensors).
    The pickle is pre-scanned first (:func:`scan_pickle`), so every unpickler ckptio makes is
    guarded; one that needs a dict memo (:func:`needs_dict_memo`) gets the pure-Python
    unpickler."""
    scan = scan_pickle(loader.archive.name, pickle_bytes, weights_only=weights_only)
    dict_memo = needs_dict_memo(scan, len(pickle_bytes))
    # Buffered: CPython's unpickler prefetches 128 KiB at a time through peek(), which BytesIO
    # lacks; without it every opcode is a read() call (20 ms of 50 for a 2 MB data.pkl).
    data = io.BufferedReader(io.BytesIO(pickle_bytes), max(1, min(len(pickle_bytes), 1 << 20)))
    checked = _checked_rebuilds(loader.archive.name) if rebuilds is None else rebuilds
    if weights_only:
        allowed = {**_allowed_globals(), **checked}
        cls = _DictMemoWeightsOnlyUnpickler if dict_memo else _WeightsOnlyUnpickler
        return cls(data, loader, allowed, pickle_load_args.get("encoding", "utf-8"), pickle_bytes)
    base = pickle_module.Unpickler
    if dict_memo:
        base = _dict_memo_base(base, scan.memo_size, loader.archive.name)
    unpickler = _full_unpickler_class(base)(data, **pickle_load_args)
    unpickler._loader = loader
    unpickler._checked = checked
    return unpickler
