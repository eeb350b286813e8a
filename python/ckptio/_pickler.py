"""Save side: pickles an object the way torch.save does and collects its storages (the save
pipeline, _writer.py, writes them, while the pickler runs when it can).

The pickle is torch's: protocol 2 by default, tensors reduced by torch itself
(``Tensor.__reduce_ex__``), and one persistent id ``("storage", type, key, location, numel)``
per distinct storage, keyed in order of first appearance. Views keep their storage offset and
strides; tensors that share a storage share one record.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from typing import Any

import torch
from torch.serialization import location_tag, normalize_storage_type

from . import _core
from ._storage_types import typed_storage, typed_storage_direct
from ._util import gc_paused

__all__ = ["dumps"]


def dumps(
    obj: Any,
    pickle_module: Any = pickle,
    protocol: int = 2,
    sink: tuple[_core.zip.ArchiveWriter, int, frozenset[str]] | None = None,
    storages: list[torch.UntypedStorage] | None = None,
) -> tuple[bytes, list[torch.UntypedStorage]]:
    """Returns (data.pkl bytes, storages in key order). Storages may live on any device.

    With a `sink` (writer, alignment, direct locations), each new storage also becomes the
    writer's record ``data/<key>`` as the pickler finds it: added (written from its memory
    while pickling goes on) when its location tag is in the direct locations, else reserved
    for the caller to write. `storages`: an empty list to collect them in, which the caller
    holds while the writer may still read them, also when pickling raises."""
    # Shared with the C persistent_id (_core.pickling.storage_ids), which handles the storages whose
    # dtype and device this function has already seen.
    if storages is None:
        storages = []
    keys: dict[int, str] = {}  # storage._cdata -> key
    dtypes: dict[int, torch.dtype] = {}  # data_ptr -> dtype, to refuse one storage as two types
    # memo of the legacy storage class (and the item size) per dtype
    storage_types: dict[torch.dtype, tuple[Any, int]] = {}
    locations: dict[torch.device, str] = {}  # memo of location_tag per device with data

    def storage_id(obj: Any) -> tuple | None:
        if isinstance(obj, torch.storage.TypedStorage):
            storage = obj._untyped_storage
            dtype = obj.dtype
            entry = storage_types.get(dtype)
            if entry is None:
                storage_class = getattr(torch, obj._pickle_storage_type())
                entry = storage_types[dtype] = (storage_class, dtype.itemsize)
            storage_type = entry[0]
            numel = storage.nbytes() // dtype.itemsize  # == obj._size(), without its overhead
        elif torch.is_storage(obj):
            storage = obj
            dtype = torch.uint8
            storage_type = normalize_storage_type(type(obj))
            numel = storage.nbytes()
        else:
            return None
        ptr = storage.data_ptr()
        if storage.device.type != "meta" and ptr != 0:
            seen = dtypes.setdefault(ptr, dtype)
            if seen != dtype:
                raise RuntimeError(
                    "Cannot save multiple tensors or storages that view the same data as "
                    f"different types ({seen} and {dtype})"
                )
        fake = getattr(obj, "_fake_device", None)
        if fake is not None:
            location = str(fake)
        else:  # torch's tag depends on the device alone
            device = storage.device
            location = locations.get(device) or location_tag(storage)
            if device.type != "meta":
                locations[device] = location
        key = keys.get(storage._cdata)
        if key is None:
            key = str(len(keys))
            if sink is not None:  # as the C storage_ids does: the writer first
                writer, alignment, direct = sink
                if location in direct:
                    writer.add("data/" + key, alignment, storage.data_ptr(), storage.nbytes())
                else:
                    writer.reserve("data/" + key, alignment, storage.nbytes())
            keys[storage._cdata] = key
            storages.append(storage)
        return ("storage", storage_type, key, location, numel)

    persistent_ids: dict[type, Any] = dict.fromkeys(_STORAGE_TYPES, storage_id)
    if _C_HOOKS:
        persistent_ids[_TypedStorage] = _core.pickling.storage_ids(
            storage_id,
            _TypedStorage,
            torch.UntypedStorage,
            storage_types,
            locations,
            keys,
            storages,
            dtypes,
            sink,
        )

    class _Pickler(pickle_module.Pickler):  # type: ignore[name-defined,misc]
        # Both hooks run for every object pickled (about 19 per tensor of a state dict). As C
        # callables that look the object's exact type up, only storages and plain tensors
        # reach their functions, and those are C too for the common case (builtins do not
        # bind, so as class attributes they get obj alone).
        persistent_id = _core.pickling.dispatch_by_type(persistent_ids, None)
        reducer_override = _core.pickling.dispatch_by_type(_REDUCERS, NotImplemented)

    buf = io.BytesIO()
    pickler = _Pickler(buf, protocol=protocol)
    with gc_paused():
        pickler.dump(obj)
        # Free the memo (a storage wrapper, an OrderedDict and tuples per tensor) while the
        # collector is paused, so it never scans them.
        pickler.clear_memo()
    return buf.getvalue(), storages


# torch.is_storage's classes: TypedStorage, UntypedStorage and the legacy typed classes.
_STORAGE_TYPES = frozenset(torch._storage_classes) | {
    torch.storage.TypedStorage,
    torch.storage.UntypedStorage,
}
_NEW_DTYPES = frozenset(torch.storage._new_dtypes())
# The devices of the fast path, as the tensor flags that name them (cheaper than
# t.device.type): CPU and CUDA.
_FAST_DEVICE_FLAGS = ("is_cpu", "is_cuda")
_STRIDED = torch.strided
# torch._utils._get_obj_state(t) of a plain tensor is its __dict__ (empty: no state) unless
# torch.Tensor defines its own __getstate__.
_STATE_IS_DICT = getattr(torch.Tensor, "__getstate__", None) is getattr(
    object, "__getstate__", None
)


class _EmptyHooks:
    """Stands for the empty ``OrderedDict()`` of backward hooks in a reduced tensor and
    pickles exactly as one (``collections.OrderedDict``, empty tuple, REDUCE; one fresh
    object per tensor, so memoised alike), without the generic reduction that looks up
    OrderedDict's slot names in Python on every call (a builtin type cannot cache them)."""

    __slots__ = ()


_EMPTY_HOOKS_REDUCTION = (OrderedDict, ())


def _reduce_plain_tensor(t: torch.Tensor) -> Any:
    """What ``Tensor.__reduce_ex__`` returns for a plain dense tensor, without its per-call
    overhead (about 30 us a tensor, most of torch.save's time on small tensors). Anything
    unusual (hooks, Python state, quantized, sparse, nested, other devices, skip_data) takes
    torch's own path, so the pickle is always the one torch would write."""
    if (
        t.layout is not _STRIDED
        or not (t.is_cpu or t.is_cuda)  # _FAST_DEVICE_FLAGS
        or t.is_quantized
        or t.is_nested
        or t._backward_hooks
        or (t.__dict__ if _STATE_IS_DICT else torch._utils._get_obj_state(t))
    ):
        return NotImplemented
    dtype = t.dtype
    if dtype in _NEW_DTYPES:
        func: Any = torch._utils._rebuild_tensor_v3
        storage: Any = t.untyped_storage()
    else:
        func = torch._utils._rebuild_tensor_v2
        storage = typed_storage(t.untyped_storage(), dtype)
    args: tuple = (
        storage,
        t.storage_offset(),
        tuple(t.size()),
        t.stride(),
        t.requires_grad,
        _EmptyHooks(),
    )
    if func is torch._utils._rebuild_tensor_v3:
        args += (dtype,)
    metadata = torch._C._get_tensor_metadata(t)  # type: ignore[attr-defined]
    if metadata:
        args += (metadata,)
    return (func, args)


def _reduce_empty_hooks(_hooks: _EmptyHooks) -> Any:
    return _EMPTY_HOOKS_REDUCTION


_TypedStorage = torch.storage.TypedStorage
# The C forms of storage_id and _reduce_plain_tensor (csrc/bindings/register_pickle.cpp) build
# TypedStorage wrappers as typed_storage_direct does: only where that builds what the
# constructor builds, and where torch reduces a tensor's state as its __dict__.
_C_HOOKS = typed_storage is typed_storage_direct and _STATE_IS_DICT

# reducer_override by exact type: plain tensors and the hooks stand-in; everything else
# (subclasses such as Parameter included) reduces as pickle and torch reduce it.
_REDUCERS: dict[type, Any] = {
    torch.Tensor: _core.pickling.tensor_reducer(
        _reduce_plain_tensor,
        _STRIDED,
        _FAST_DEVICE_FLAGS,
        _NEW_DTYPES,
        torch._utils._rebuild_tensor_v2,
        _TypedStorage,
        _EmptyHooks,
        torch._C._get_tensor_metadata,  # type: ignore[attr-defined]
    )
    if _C_HOOKS
    else _reduce_plain_tensor,
    _EmptyHooks: _reduce_empty_hooks,
}
