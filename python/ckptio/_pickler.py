"""Save side: pickles an object the way torch.save does and collects its storages.

The pickle is torch's: protocol 2 by default, tensors reduced by torch itself
(``Tensor.__reduce_ex__``), and one persistent id ``("storage", type, key, location, numel)``
per distinct storage, keyed in order of first appearance. Views keep their storage offset and
strides; tensors that share a storage share one record.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.serialization import location_tag, normalize_storage_type

__all__ = ["dumps"]


def dumps(
    obj: Any, pickle_module: Any = pickle, protocol: int = 2
) -> tuple[bytes, list[torch.UntypedStorage]]:
    """Returns (data.pkl bytes, storages in key order). Storages may live on any device."""
    storages: list[torch.UntypedStorage] = []
    keys: dict[int, str] = {}  # storage._cdata -> key
    dtypes: dict[int, torch.dtype] = {}  # data_ptr -> dtype, to refuse one storage as two types

    def persistent_id(obj: Any) -> tuple | None:
        if isinstance(obj, torch.storage.TypedStorage):
            storage = obj._untyped_storage
            dtype = obj.dtype
            storage_type = getattr(torch, obj._pickle_storage_type())
            numel = obj._size()
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
        key = keys.get(storage._cdata)
        if key is None:
            key = keys[storage._cdata] = str(len(keys))
            storages.append(storage)
        fake = getattr(obj, "_fake_device", None)
        location = str(fake) if fake is not None else location_tag(storage)
        return ("storage", storage_type, key, location, numel)

    class _Pickler(pickle_module.Pickler):  # type: ignore[name-defined,misc]
        def persistent_id(self, obj: Any) -> Any:
            return persistent_id(obj)

    buf = io.BytesIO()
    _Pickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue(), storages
