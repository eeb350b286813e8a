"""TypedStorage wrappers, as both sides build them: the loader wraps each storage it makes,
the pickler wraps each plain tensor's storage it reduces (as ``Tensor.__reduce_ex__`` does).

``TypedStorage(wrap_storage=..., dtype=..., _internal=True)`` parses its arguments on every
call, which is most of its cost; :func:`typed_storage_direct` sets the two attributes that
constructor leaves behind. :func:`typed_storage` is the shortcut where this torch's
constructor builds exactly that (checked once, at import), else the constructor.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "direct_construction_matches",
    "typed_storage",
    "typed_storage_by_constructor",
    "typed_storage_direct",
]

_TypedStorage = torch.storage.TypedStorage
_new_object = object.__new__


def typed_storage_by_constructor(storage: Any, dtype: torch.dtype) -> Any:
    return _TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)


def typed_storage_direct(storage: Any, dtype: torch.dtype) -> Any:
    # What TypedStorage(wrap_storage=..., dtype=..., _internal=True) leaves behind, without
    # its argument parsing (most of its cost): the two attributes it sets.
    if type(storage) is not torch.UntypedStorage:
        return typed_storage_by_constructor(storage, dtype)
    typed = _new_object(_TypedStorage)
    typed.dtype = dtype
    typed._untyped_storage = storage
    return typed


def direct_construction_matches() -> bool:
    """Whether the shortcut builds exactly what the constructor builds in this torch."""
    try:
        storage = torch.UntypedStorage(4)
        ref = typed_storage_by_constructor(storage, torch.float32)
        fast = typed_storage_direct(storage, torch.float32)
    except Exception:
        return False
    return type(ref) is type(fast) and ref.__dict__ == fast.__dict__


#: The wrapper both sides use: typed_storage_direct where it builds what the constructor
#: builds in this torch, else the constructor.
typed_storage = (
    typed_storage_direct if direct_construction_matches() else typed_storage_by_constructor
)
