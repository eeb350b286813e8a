"""Small helpers shared by the save and load paths."""

from __future__ import annotations

import contextlib
import gc
import json
import re
import sysconfig
from typing import Any, Iterable, Iterator, Sequence

import torch

__all__ = [
    "DuplicateKeyError",
    "contiguous_strides",
    "gc_paused",
    "is_environment_error",
    "is_torch_refusal",
    "json_without_duplicates",
    "mmap_shared",
    "torch_load_state",
    "walk_leaves",
]

# Errors of the machine, never of a file (every size a file declares is checked against the
# file before anything is allocated): the OS, memory, and the accelerator.
_ENVIRONMENT_ERRORS: tuple[type[BaseException], ...] = tuple(
    t
    for t in (
        OSError,
        MemoryError,
        getattr(torch, "OutOfMemoryError", None),
        getattr(torch.cuda, "OutOfMemoryError", None),
        getattr(torch, "AcceleratorError", None),
        getattr(torch.cuda, "CudaError", None),
    )
    if isinstance(t, type)
)


def is_environment_error(e: BaseException) -> bool:
    """Whether `e` is the machine's failure, not the file's: it must reach the caller as it
    is (``except torch.cuda.OutOfMemoryError:`` fallbacks), never as a CheckpointError.
    torch's CPU allocator raises a plain RuntimeError, recognised by its message."""
    if isinstance(e, _ENVIRONMENT_ERRORS):
        return True
    return type(e) is RuntimeError and "can't allocate memory" in str(e)


# How torch's messages begin when it refuses a valid file because of the caller's arguments
# or this host, not the file: TorchScript or legacy .tar files under weights_only, mmap of a
# legacy file, storages saved on a device this host lacks (RuntimeError); a map_location
# that torch.jit.load does not take (ValueError, torch 2.5).
_TORCH_REFUSAL: dict[type[BaseException], re.Pattern[str]] = {
    RuntimeError: re.compile(
        r"Cannot use ``weights_only=True`` with "
        r"|mmap can only be used with files saved with "
        r"|Attempting to deserialize object on "
        r"|The \w+ device module is not registered"
    ),
    ValueError: re.compile(r"map_location should be either None, string or torch\.device"),
}


def is_torch_refusal(e: BaseException) -> bool:
    """Whether `e` is torch refusing a valid file for the caller's arguments or this host (a
    plain RuntimeError or ValueError with one of torch's messages): it reaches the caller as
    torch raised it, never as a CheckpointError."""
    pattern = _TORCH_REFUSAL.get(type(e))
    return pattern is not None and pattern.match(str(e)) is not None


@contextlib.contextmanager
def torch_load_state(map_location: Any, *, validate: bool) -> Iterator[None]:
    """The torch-global state of an unpickling, left as torch.load leaves it.

    During the block, the thread's ``torch.serialization._serialization_tls.map_location``
    is `map_location` (torch's rebuild functions consult it); afterwards it is what it was.
    torch's sparse-tensor rebuilds queue each tensor in ``torch._utils._sparse_tensors_to_validate``
    for a check once the load's data is in: with `validate`, a block that succeeds runs that
    check (which empties the queue), as torch.load does; otherwise (a parse over placeholder
    storages, whose tensors hold no data) and whenever the block fails, the entries it added
    are dropped, so no later load trips over them.
    """
    tls = getattr(torch.serialization, "_serialization_tls", None)
    queue: list[Any] = getattr(torch._utils, "_sparse_tensors_to_validate", [])
    queued = len(queue)
    previous = getattr(tls, "map_location", None)
    if tls is not None:
        tls.map_location = map_location
    succeeded = False
    try:
        yield
        succeeded = True
    finally:
        if tls is not None:
            tls.map_location = previous
        if not (succeeded and validate):
            del queue[queued:]
    if validate:
        torch._utils._validate_loaded_sparse_tensors()


# gc.freeze() walks the whole heap where there is no GIL (free-threaded CPython); with the GIL
# it splices the generations' lists, a constant time.
_FREEZE_IS_CHEAP = not sysconfig.get_config_var("Py_GIL_DISABLED")


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pauses the cyclic garbage collector around (un)pickling. Both create a few objects per
    tensor and no cycles; with 20,000 tensors the collector's repeated passes over them cost
    about a third of the time.

    On resuming, the objects made meanwhile (a load's tensors, storages and containers) are
    moved to the oldest generation, as objects that lived through collections would have
    been: ``gc.freeze()`` then ``gc.unfreeze()``, which move every tracked object to the
    permanent generation and back into the oldest one without scanning any. Otherwise the
    collector, finding them all new at once, would run a full collection at the program's
    next allocations: 0.10-0.15 s after a load of 20,000 tensors, for a process that has
    imported torch, paid by whatever the program does next. They are still collected by
    the full collections to come. Skipped where the caller has frozen objects itself
    (``gc.get_freeze_count()``), which ``unfreeze`` would thaw, and where freezing scans
    the heap (free-threaded CPython), and after an error: what a failed load made is garbage,
    some of it in cycles through the traceback, for the next young collection to free."""
    was_enabled = gc.isenabled()
    gc.disable()
    succeeded = False
    try:
        yield
        succeeded = True
    finally:
        if was_enabled:
            if succeeded and _FREEZE_IS_CHEAP and gc.get_freeze_count() == 0:
                gc.freeze()
                gc.unfreeze()
            gc.enable()


class DuplicateKeyError(ValueError):
    """A JSON object repeats a key."""


def mmap_shared() -> bool:
    """Whether torch's default mmap flags (``torch.serialization.set_default_mmap_options``)
    are MAP_SHARED: mappings ``mmap=True`` makes then write through to the file."""
    import mmap

    getter = getattr(torch.serialization, "get_default_mmap_options", None)
    return getter is not None and getter() == getattr(mmap, "MAP_SHARED", -1)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(f"the key {key!r} appears twice")
        out[key] = value
    return out


def json_without_duplicates(text: str | bytes) -> Any:
    """``json.loads`` that refuses an object with a repeated key (json keeps the last one
    silently): DuplicateKeyError, a ValueError as for any malformed JSON (RecursionError for
    absurd nesting)."""
    return json.loads(text, object_pairs_hook=_no_duplicate_keys)


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major strides of `shape`, in elements (a zero-size dimension counts as 1, as torch)."""
    strides = []
    step = 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


def _children(link: Any, items: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
    return (((link, key), value) for key, value in items)


def walk_leaves(
    obj: Any, path: tuple = (), leaf: type | tuple[type, ...] = ()
) -> Iterator[tuple[tuple, Any]]:
    """(key path, leaf) pairs of a saved object, in order, each path prefixed by `path`:
    dicts by key, lists and tuples by index (a torch.Size, empty containers and instances of
    `leaf`, such as a NamedTuple, are leaves). Iterative, each path built only for its
    leaf: a pickle may nest objects as deep as CPython's (iterative) unpickler builds them,
    and walks in linear time."""
    # Each object comes with its link, (its container's link, its key); the root's is None.
    stack: list[Iterator[tuple[Any, Any]]] = [iter([(None, obj)])]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        link, o = entry
        if not (leaf and isinstance(o, leaf)):
            if isinstance(o, dict) and o:
                stack.append(_children(link, o.items()))
                continue
            if isinstance(o, (list, tuple)) and o and not isinstance(o, torch.Size):
                stack.append(_children(link, enumerate(o)))
                continue
        keys = []  # a tensor, or any other leaf
        while link is not None:
            link, key = link
            keys.append(key)
        yield (*path, *reversed(keys)), o
