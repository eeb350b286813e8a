"""``save`` and ``load``: drop-in replacements for ``torch.save`` and ``torch.load``.

Same arguments, same results; the difference is how bytes move. ``save`` writes torch's zip
format with every ``data/*`` record page-aligned, from a thread pool, into a temporary file
that is renamed over the target only once complete. ``load`` parses the container in C++,
unpickles with a restricted unpickler by default, and reads all storages in one parallel
batch, or maps the file once with ``mmap=True``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import secrets
import socket
import stat
import sys
import threading
import warnings
from typing import IO, Any, Callable, Mapping, Sequence, Union

import torch

from . import _core, _safetensors
from ._archive import ArchiveReader, archive_name_for, torch_records, write_archive
from ._files import for_torch, open_source
from ._legacy import check_legacy
from ._pickler import dumps, save_archive
from ._staging import save_payloads
from ._unpickler import (
    StorageLoader,
    make_unpickler,
    pickle_module_for,
    refused_globals_error,
    scan_pickle,
)
from ._util import gc_paused, is_environment_error, is_torch_refusal, torch_load_state
from .errors import CheckpointError
from .settings import get_options

__all__ = ["load", "save"]

FileLike = Union[str, os.PathLike, IO[bytes]]
DEFAULT_PROTOCOL = 2
# torch's own functions, captured before ckptio.patch_torch() can replace them: what ckptio
# hands over to torch must never come back to ckptio.
torch_save = torch.serialization.save
torch_load = torch.serialization.load


def _is_path(f: object) -> bool:
    return isinstance(f, (str, bytes, os.PathLike))


# ------------------------------------------------------------------------------------- save
def save(
    obj: object,
    f: FileLike,
    pickle_module: Any = pickle,
    pickle_protocol: int = DEFAULT_PROTOCOL,
    _use_new_zipfile_serialization: bool = True,
    _disable_byteorder_record: bool = False,
    *,
    format: str = "torch",
    metadata: Mapping[str, str] | None = None,
    clone_shared: bool = False,
) -> None:
    """Saves `obj` to `f` exactly as :func:`torch.save` would, only faster.

    The file is torch's zip format with ``data/*`` records aligned to 4096 bytes, so it loads
    with stock ``torch.load`` in every mode. Saving to a path writes a temporary file next to
    it and renames it into place: an error or a kill mid-save never leaves a torn file and
    never removes the previous one.

    Args:
        obj: anything torch.save accepts (state dicts, optimizer states, nested containers...).
        f: a path (str or os.PathLike) or a writable binary file object.
        pickle_module: module providing ``Pickler`` (as torch.save).
        pickle_protocol: pickle protocol; torch's default 2 keeps weights-only loading working.
        format: ``"torch"`` (torch's zip format) or ``"safetensors"``: `obj` must then be a
            flat dict of str -> dense, contiguous tensor; the file is byte-for-byte what
            ``safetensors.torch.save_file`` writes (docs/safetensors.md).
        metadata: safetensors only: the str -> str ``__metadata__`` of the header.
        clone_shared: safetensors only: store tensors that share memory as independent
            copies instead of refusing them (the default refuses, naming the keys).

    Example::

        >>> ckptio.save(model.state_dict(), "model.pt")
        >>> model.load_state_dict(ckptio.load("model.pt"))
    """
    if format == "safetensors":
        _save_safetensors(obj, f, metadata, clone_shared)
        return
    if format != "torch":
        raise ValueError(f"format must be 'torch' or 'safetensors', got {format!r}")
    if metadata is not None or clone_shared:
        raise ValueError("metadata and clone_shared apply only to format='safetensors'")
    tls = getattr(torch.serialization, "_serialization_tls", None)
    if not _use_new_zipfile_serialization or getattr(tls, "skip_data", False):
        # The legacy (pre-1.6) format has no layout to parallelize, and skip_data() writes
        # headers without payloads: torch writes both.
        torch_save(
            obj,
            f,
            pickle_module,
            pickle_protocol,
            _use_new_zipfile_serialization=_use_new_zipfile_serialization,
            _disable_byteorder_record=_disable_byteorder_record,
        )
        return
    if not _is_path(f) and not callable(getattr(f, "write", None)):
        raise TypeError(f"f must be a path or a writable binary file object, got {type(f)!r}")
    opts = get_options()
    byteorder = None if _disable_byteorder_record else sys.byteorder
    name = archive_name_for(f)

    def write(target: Any) -> None:
        if isinstance(target, _core.File):
            # Storages go out while the pickler runs; CUDA ones through the staging ring.
            save_archive(target, name, obj, pickle_module, pickle_protocol, byteorder=byteorder)
            return
        pickle_bytes, storages = dumps(obj, pickle_module, pickle_protocol)
        storage_payloads, keepalive = save_payloads(storages)
        specs, payloads = torch_records(
            pickle_bytes, storage_payloads, data_alignment=opts.data_alignment, byteorder=byteorder
        )
        write_archive(target, name, specs, payloads, crc32=opts.crc32)
        del keepalive  # payload addresses stayed valid until here

    _write_to(f, write, opts.durable)


def _save_safetensors(
    obj: Any, f: FileLike, metadata: Mapping[str, str] | None, clone_shared: bool
) -> None:
    if not _is_path(f) and not callable(getattr(f, "write", None)):
        raise TypeError(f"f must be a path or a writable binary file object, got {type(f)!r}")
    layout = _safetensors.plan(obj, metadata, clone_shared)
    _write_to(f, lambda target: _safetensors.write(target, layout), get_options().durable)


def _write_to(f: FileLike, write: Callable[[Any], object], durable: bool) -> None:
    """Runs `write` on a _core.File (a path: atomically) or on the writable file object f."""
    if isinstance(f, (str, bytes, os.PathLike)):
        _save_to_path(os.fsdecode(f), write, durable)
    else:
        write(f)
        flush = getattr(f, "flush", None)
        if callable(flush):
            flush()


def _save_to_path(path: str, write: Callable[[Any], object], durable: bool) -> None:
    # Write through a symlink to its target, as open(path, "wb") would.
    target = os.path.realpath(path) if os.path.islink(path) else path
    try:
        mode: int | None = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(mode):
            # A device, FIFO or socket: write into it as torch.save would, never replace it.
            with open(target, "wb") as fh:
                write(fh)
            return
        if not os.access(target, os.W_OK):
            # A rename would replace a file the caller may not write; refuse as open() does.
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
    _write_file_atomically(path, target, mode, write, durable)


def _write_file_atomically(
    path: str,
    target: str,
    mode: int | None,
    write: Callable[[Any], object],
    durable: bool,
) -> None:
    """Writes a temporary file beside `target` and renames it over `target` when complete.

    With `durable`, the file is fsynced before the rename and the directory after it, so the
    new name survives a power loss once this returns."""
    directory = os.path.dirname(os.path.abspath(target))
    base = os.path.basename(target)
    remove_stale_temp_files(directory, base)
    tmp = os.path.join(directory, temp_file_name(base, os.getpid()))
    try:
        # 0o666 minus the umask, as a plain open() would; an existing target keeps its mode.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except OSError as e:  # report the caller's path, not the temporary name
        raise type(e)(e.errno, e.strerror, path) from None
    try:
        if mode is not None:
            os.fchmod(fd, stat.S_IMODE(mode))
        file = _core.File.adopt(fd, tmp)
        os.close(fd)
        fd = -1
        with file:
            write(file)
            if durable:
                file.sync()
        replaced = _hold(target) if mode is not None else -1
        try:
            os.replace(tmp, target)
        finally:
            if replaced >= 0:
                _close_in_background(replaced)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _hold(path: str) -> int:
    """A read-only descriptor of the file a save is about to replace, or -1. Held across the
    rename, it makes the last close, not the rename, free the old file (its blocks and page
    cache: 40 ms for 700 MB here), and _close_in_background moves that off the save."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return -1  # unreadable (write-only mode): the rename frees it, as before


def _close_in_background(fd: int) -> None:
    threading.Thread(target=os.close, args=(fd,), name="ckptio-release", daemon=True).start()


# Temporary files are named ".<target name>.ckptio-<host>-<pid>-<random>.tmp": hidden, beside
# the target, recognisable, and carrying their writer. A writer killed mid-save (SIGKILL, OOM
# killer) leaves one behind; the next save to the same target removes those whose writer ran
# on this host and is no longer alive (docs/training.md, "Crash semantics").
_TEMP_MARK = ".ckptio-"
_HOST_TAG = hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


def temp_file_name(base: str, pid: int) -> str:
    """The name of a temporary file of a save to `base` by process `pid` on this host."""
    return f".{base}{_TEMP_MARK}{_HOST_TAG}-{pid}-{secrets.token_hex(4)}.tmp"


def remove_stale_temp_files(directory: str, base: str) -> list[str]:
    """Removes the temporary files of saves to `base` whose writer, a process of this host,
    is dead; returns their names. Best effort: errors are ignored (the save goes on)."""
    prefix = f".{base}{_TEMP_MARK}{_HOST_TAG}-"
    removed: list[str] = []
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix) and n.endswith(".tmp")]
    except OSError:
        return removed
    for name in names:
        pid_text = name[len(prefix) :].split("-", 1)[0]
        if not pid_text.isdigit() or _process_alive(int(pid_text)):
            continue
        try:
            os.unlink(os.path.join(directory, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process may be writing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


# ------------------------------------------------------------------------------------- load
def _resolve_weights_only(weights_only: bool | None, pickle_module: Any) -> bool:
    """torch.load's rules: the default is safe unless a pickle_module is given; the
    TORCH_FORCE_(NO_)WEIGHTS_ONLY_LOAD environment variables override as in torch."""
    true_values = ("1", "y", "yes", "true")
    force_on = os.getenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in true_values
    force_off = os.getenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() in true_values
    if force_on and force_off:
        raise RuntimeError(
            "Only one of `TORCH_FORCE_WEIGHTS_ONLY_LOAD` or "
            "`TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` should be set, but both were set."
        )
    if force_on:
        return True
    if weights_only is None:
        return not force_off and pickle_module is None
    return bool(weights_only)


def load(
    f: FileLike,
    map_location: Any = None,
    pickle_module: Any = None,
    *,
    weights_only: bool | None = None,
    mmap: bool | None = None,
    **pickle_load_args: Any,
) -> Any:
    """Loads an object saved with :func:`save` or :func:`torch.save`, as :func:`torch.load`.

    A safetensors file (recognized by its bytes, whatever its name) loads too, through the
    same eager, mmap and map_location paths, as a dict of tensors (docs/safetensors.md).

    Args:
        f: a path or a readable, seekable binary file object.
        map_location: None, a device string, a ``torch.device``, a dict mapping saved
            locations to new ones, or a callable ``(storage, location) -> storage``.
        pickle_module: only with ``weights_only=False``: the module whose ``Unpickler`` runs.
        weights_only: True (the default unless `pickle_module` is given) refuses every global
            torch's weights-only loader refuses: no code from the file runs. False runs the
            full unpickler; only for files you trust.
        mmap: map the file and return tensors that view it (zero-copy, copy-on-write) instead
            of reading it into memory. Needs a path.
        **pickle_load_args: passed to the unpickler (e.g. ``encoding``) when
            ``weights_only=False``.

    Raises:
        CheckpointError: the file is malformed (the message names it and the problem).
        UnsafeGlobalError: a weights-only load met a global that is not allowed.
        OSError: the OS failed (missing file, permission, I/O error).

    Example::

        >>> sd = ckptio.load("model.pt", map_location="cpu")
        >>> sd = ckptio.load("model.pt", mmap=True)  # zero-copy
    """
    weights_only = _resolve_weights_only(weights_only, pickle_module)
    if weights_only:
        if pickle_module is not None:
            raise RuntimeError(
                "Can not safely load weights when explicit pickle_module is specified"
            )
    elif pickle_module is None:
        pickle_module = pickle
    if pickle_load_args and weights_only:
        warnings.warn("pickle_load_args only works if `weights_only=False`.", stacklevel=2)
    if mmap is None:
        mmap = _default_mmap()

    shared = bool(mmap) and _mmap_shared()
    start: int | None = None  # where a file object was read from, to hand it on to torch
    if isinstance(f, (str, bytes, os.PathLike)):
        path = os.fsdecode(f)
        # A MAP_SHARED mapping writes through to the file, so it needs a writable descriptor.
        mode = _core.FileMode.READ_WRITE if shared else _core.FileMode.READ
        file: _core.File | None = _core.File.open(path, mode)
        source: Any = file
    else:
        if mmap:
            raise ValueError("f must be a file path in order to use the mmap argument")
        # An open regular file: parallel preads, no copy in memory; any other object (BytesIO,
        # gzip.open...) is read through its own read() (_files.py).
        source, file, start = open_source(f)
    try:
        head = source.pread(0, min(9, source.size))
        if _safetensors.looks_like_safetensors(head, source.size):
            # safetensors holds no code: weights_only and pickle arguments have nothing to do.
            mapping = _core.Mapping(file, shared) if file is not None and mmap else None
            return _safetensors.load(source, map_location, mapping)
        head = head[:4]
        if not _core.looks_like_zip(head):
            return _load_legacy(
                for_torch(f, start),
                map_location,
                pickle_module,
                weights_only,
                mmap,
                source.name,
                source.pread(0, source.size),
                pickle_load_args,
            )
        archive = ArchiveReader(source)
        if (
            archive.has("constants.pkl")
            or not _plain_byteorder(archive)
            or torch._guards.detect_fake_mode(None) is not None
        ):
            # TorchScript archives, byte-swapped files and loads under a FakeTensorMode:
            # torch's own loader handles them (_load_with_torch checks data.pkl first).
            pickles = []
            if archive.has("data.pkl") and not archive.has("constants.pkl"):
                pickles.append(archive.read("data.pkl"))
            return _load_with_torch(
                for_torch(f, start),
                map_location,
                pickle_module,
                weights_only,
                mmap,
                pickle_load_args,
                archive.name,
                pickles,
            )
        _check_version(archive)
        mapping = _core.Mapping(file, shared) if file is not None and mmap else None
        return _unpickle(
            archive, map_location, mapping, weights_only, pickle_module, pickle_load_args
        )
    finally:
        if file is not None:
            file.close()


def _unpickle(
    archive: ArchiveReader,
    map_location: Any,
    mapping: Any,
    weights_only: bool,
    pickle_module: Any,
    pickle_load_args: dict[str, Any],
) -> Any:
    loader = StorageLoader(archive, map_location, mapping)
    unpickler = make_unpickler(
        archive.read("data.pkl"),
        loader,
        weights_only=weights_only,
        pickle_module=pickle_module,
        **{"encoding": "utf-8", **pickle_load_args},
    )
    try:
        # Meta tensors hold no data to check (torch.load's check fails on them).
        with torch_load_state(map_location, validate=not loader.is_meta):
            with gc_paused():
                result = unpickler.load()
                # The memo holds every object of the pickle; free what the result does not
                # keep (storage wrappers, argument tuples) while the collector is paused.
                unpickler.memo.clear()
            loader.flush()
    except (CheckpointError, KeyboardInterrupt):
        raise
    except Exception as e:
        if not weights_only or e is loader.foreign_error or is_environment_error(e):
            # User code or map_location raised, or ckptio's own allocation, reads or
            # placement of storages failed: not the file's fault, so it goes out as it is.
            raise
        raise CheckpointError(
            f"{archive.name}: data.pkl could not be unpickled: {type(e).__name__}: {e}"
        ) from e
    finally:
        loader.join_prefetch()  # a failed load leaves no read running
    return result


def _check_version(archive: ArchiveReader) -> None:
    name = ".data/version" if archive.has(".data/version") else "version"
    if not archive.has(name):
        raise CheckpointError(
            f"{archive.name}: the archive has no version record; it is not a torch checkpoint"
        )
    raw = archive.read(name).strip()
    if not raw.isdigit() or not 1 <= int(raw) <= 10:
        raise CheckpointError(
            f"{archive.name}: unsupported archive version {raw[:20]!r} "
            "(torch reads versions 1 to 10)"
        )


def _plain_byteorder(archive: ArchiveReader) -> bool:
    if not archive.has("byteorder"):
        return sys.byteorder == "little"
    value = archive.read("byteorder")
    if value not in (b"little", b"big"):
        raise CheckpointError(f"{archive.name}: unknown byte order {value[:20]!r}")
    return value.decode() == sys.byteorder


def _default_mmap() -> bool:
    try:
        from torch.utils.serialization import config
    except ImportError:
        return False
    return bool(config.load.mmap)


def _mmap_shared() -> bool:
    import mmap as _mmap

    getter = getattr(torch.serialization, "get_default_mmap_options", None)
    return getter is not None and getter() == getattr(_mmap, "MAP_SHARED", -1)


def _load_with_torch(
    f: Any,
    map_location: Any,
    pickle_module: Any,
    weights_only: bool,
    mmap: bool,
    pickle_load_args: dict[str, Any],
    name: str = "",
    pickles: Sequence[bytes | memoryview] = (),
) -> Any:
    """torch.load for the files ckptio hands to torch, `pickles` being those torch will
    unpickle. torch's full loader unpickles with pickle_module's Unpickler (CPython's C one
    for `pickle`), which allocates by the pickles' lengths and memo indices: they are
    pre-scanned first, and a pickle whose memo needs a dict gets one (pickle_module_for).
    torch's weights-only unpickler keeps its memo in a dict; when it refuses a global, the
    UnsafeGlobalError names every global of `pickles` the allowlist lacks, as for ckptio's
    own loads."""
    if not weights_only:
        scans = [(scan_pickle(name, p, weights_only=False), len(p)) for p in pickles]
        pickle_module = pickle_module_for(pickle_module, scans, name)
    raised: list[BaseException] = []  # by a map_location callable
    try:
        # torch leaves a failed load's sparse tensors queued and its map_location set.
        with torch_load_state(map_location, validate=False):
            return torch_load(
                f,
                _watched(map_location, raised),
                pickle_module,
                weights_only=weights_only,
                mmap=mmap,
                **pickle_load_args,
            )
    except (CheckpointError, Warning):
        raise  # warnings turned into errors by a filter stay what they are
    except pickle.UnpicklingError as e:
        # torch's weights-only refusal: the same UnsafeGlobalError as ckptio's own loads (a
        # pickle.UnpicklingError too), naming every global the allowlist lacks.
        refusal = refused_globals_error(list(pickles)) if weights_only else None
        if refusal is None:
            raise
        raise refusal from e
    except Exception as e:
        if (
            not weights_only
            or is_environment_error(e)
            or any(e is r for r in raised)
            or is_torch_refusal(e)
        ):
            # User code ran (the full unpickler, map_location), the machine failed, or torch
            # refused a valid file for the caller's arguments or this host: keep its
            # exceptions as they are (as torch.load raises them).
            raise
        # A corrupt legacy or delegated file: torch raises whatever its parser met
        # (RuntimeError, EOFError, struct.error...); ckptio's contract is CheckpointError.
        raise CheckpointError(
            f"{name}: torch's loader could not read the file: {type(e).__name__}: {e}"
        ) from e


def _watched(map_location: Any, raised: list[BaseException]) -> Any:
    """map_location, or, for a callable (user code), one that notes in `raised` what it
    raises, so that its exceptions are not taken for the file's."""
    if not callable(map_location) or isinstance(map_location, (str, bytes, dict, torch.device)):
        return map_location

    def restore(storage: Any, location: str) -> Any:
        try:
            return map_location(storage, location)
        except BaseException as e:
            raised.append(e)
            raise

    return restore


def _load_legacy(
    f: Any,
    map_location: Any,
    pickle_module: Any,
    weights_only: bool,
    mmap: bool,
    name: str,
    data: bytes,
    pickle_load_args: dict[str, Any],
) -> Any:
    # Legacy (pre-1.6 / _use_new_zipfile_serialization=False) files start with a pickled
    # magic number (protocol 2: 0x80 0x02). torch's own parser reads them, under the same
    # weights_only rules; anything else is not a checkpoint.
    head = data[:4]
    if len(head) < 2 or head[0] != 0x80:
        raise CheckpointError(
            f"{name}: not a torch checkpoint (neither a zip archive nor a "
            f"legacy torch file; it starts with {head!r})"
        )
    legacy_pickles = check_legacy(data, name)
    if mmap:
        # torch's refusal, word for word: the file is valid, mmap needs another format.
        f_name = f"{f}, " if isinstance(f, str) else ""
        raise RuntimeError(
            "mmap can only be used with files saved with "
            f"`torch.save({f_name}_use_new_zipfile_serialization=True), "
            "please torch.save your checkpoint with this option in order to use mmap."
        )
    view = memoryview(data)
    return _load_with_torch(
        f,
        map_location,
        pickle_module,
        weights_only,
        False,
        pickle_load_args,
        name,
        [view[p.start : p.end] for p in legacy_pickles],
    )
