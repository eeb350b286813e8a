"""Route ``torch.save`` / ``torch.load`` through ckptio without changing the caller's code.

``patch_torch()`` replaces ``torch.save``, ``torch.load``, ``torch.serialization.save`` and
``torch.serialization.load`` with thin wrappers around :func:`ckptio.save` and
:func:`ckptio.load`; ``unpatch_torch()`` puts the original functions back, and
``patched_torch()`` does both around a ``with`` block. The wrappers accept exactly torch's
arguments: ckptio handles what it can and hands the rest to the original functions (ckptio
always calls the originals it captured at import, so a patched torch never recurses).

A patched ``torch.load`` keeps ckptio's defaults, ``weights_only=True`` included, on every
torch: on torch 2.5, whose own ``torch.load`` defaults to ``weights_only=False``, the patch
makes a call that does not pass ``weights_only`` load weights-only (pass
``weights_only=False`` for a file you trust that needs the full unpickler).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from typing import Any, Callable, Iterator

import torch

from . import serialization

__all__ = ["is_torch_patched", "patch_torch", "patched_torch", "unpatch_torch"]

_ORIGINAL_SAVE: Callable[..., Any] = serialization.torch_save
_ORIGINAL_LOAD: Callable[..., Any] = serialization.torch_load
_SAVE_SIGNATURE = inspect.signature(serialization.save)
_LOAD_SIGNATURE = inspect.signature(serialization.load)
_lock = threading.Lock()
_depth = 0  # nested patched_torch() blocks and patch_torch() calls


@functools.wraps(_ORIGINAL_SAVE)
def _save(*args: Any, **kwargs: Any) -> Any:
    try:
        _SAVE_SIGNATURE.bind(*args, **kwargs)
    except TypeError:
        return _ORIGINAL_SAVE(*args, **kwargs)  # an argument ckptio does not know: torch's
    return serialization.save(*args, **kwargs)


@functools.wraps(_ORIGINAL_LOAD)
def _load(*args: Any, **kwargs: Any) -> Any:
    try:
        _LOAD_SIGNATURE.bind(*args, **kwargs)
    except TypeError:
        return _ORIGINAL_LOAD(*args, **kwargs)
    return serialization.load(*args, **kwargs)


def _install(save: Callable[..., Any], load: Callable[..., Any]) -> None:
    torch.save = save
    torch.load = load
    torch.serialization.save = save
    torch.serialization.load = load


def patch_torch() -> None:
    """Makes ``torch.save`` and ``torch.load`` (and ``torch.serialization.save/load``) run
    ckptio. Idempotent; each call needs one :func:`unpatch_torch` to undo it.

    ``torch.load`` then loads weights-only unless told otherwise, on every torch: this changes
    torch 2.5's default (``weights_only=False``), as torch 2.6 did.

    Example::

        >>> ckptio.patch_torch()
        >>> torch.save(model.state_dict(), "model.pt")   # written by ckptio
        >>> ckptio.unpatch_torch()
    """
    global _depth
    with _lock:
        _depth += 1
        _install(_save, _load)


def unpatch_torch() -> None:
    """Undoes one :func:`patch_torch`; the last one restores torch's original functions."""
    global _depth
    with _lock:
        _depth = max(0, _depth - 1)
        if _depth == 0:
            _install(_ORIGINAL_SAVE, _ORIGINAL_LOAD)


def is_torch_patched() -> bool:
    """True while ``torch.save`` is ckptio's wrapper."""
    return torch.save is _save


@contextlib.contextmanager
def patched_torch() -> Iterator[None]:
    """``torch.save``/``torch.load`` run ckptio inside the block (process-wide, as any
    monkey-patch: other threads see it too).

    Example::

        >>> with ckptio.patched_torch():
        ...     trainer.save_checkpoint("ckpt.pt")   # a library that calls torch.save
    """
    patch_torch()
    try:
        yield
    finally:
        unpatch_torch()
