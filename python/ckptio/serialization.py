"""``save`` and ``load``: drop-in replacements for ``torch.save`` and ``torch.load``.

Same arguments, same results; the difference is how bytes move. ``save`` writes torch's zip
format with every ``data/*`` record page-aligned, from a thread pool, into a temporary file
that is renamed over the target only once complete. ``load`` parses the container in C++,
unpickles with a restricted unpickler by default, and reads all storages in one parallel
batch, or maps the file once with ``mmap=True``.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import warnings
from typing import IO, Any, Callable, Iterable, Mapping, Sequence, TypeVar, Union, cast

import torch

from . import _core, _directory, _remote, _safetensors, _verify
from ._archive import ArchiveReader, Mispredicted, archive_name_for, check_version
from ._files import for_torch, is_path, open_source, write_to
from ._legacy import check_legacy
from ._placement import Placement
from ._reads import ReadBatch
from ._remote import _upload
from ._shard_writer import save_directory
from ._unpickler import (
    StorageLoader,
    make_unpickler,
    pickle_module_for,
    refused_globals_error,
    scan_pickle,
)
from ._util import (
    gc_paused,
    is_environment_error,
    is_torch_refusal,
    mmap_shared,
    torch_load_state,
)
from ._writer import save_object
from .errors import CheckpointError
from .settings import get_options, options

__all__ = ["load", "save"]

FileLike = Union[str, os.PathLike, IO[bytes]]
_T = TypeVar("_T")
DEFAULT_PROTOCOL = 2
# torch's own functions, captured before ckptio.patch_torch() can replace them: what ckptio
# hands over to torch must never come back to ckptio.
torch_save = torch.serialization.save
torch_load = torch.serialization.load


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
    max_shard_size: int | str | None = None,
    manifest: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Saves `obj` to `f` exactly as :func:`torch.save` would, only faster.

    The file is torch's zip format with ``data/*`` records aligned to 4096 bytes, so it loads
    with stock ``torch.load`` in every mode. Saving to a path writes a temporary file next to
    it and renames it into place: an error or a kill mid-save never leaves a torn file and
    never removes the previous one.

    Args:
        obj: anything torch.save accepts (state dicts, optimizer states, nested containers...).
        f: a path (str or os.PathLike), a writable binary file object, or an
            ``s3://bucket/key`` URL: a multipart upload whose parts stream from the writer,
            the object appearing only once complete (docs/remote.md, "Saving").
        pickle_module: module providing ``Pickler`` (as torch.save).
        pickle_protocol: pickle protocol; torch's default 2 keeps weights-only loading working.
        format: ``"torch"`` (torch's zip format) or ``"safetensors"``: `obj` must then be a
            flat dict of str -> dense, contiguous tensor; the file is byte-for-byte what
            ``safetensors.torch.save_file`` writes (docs/safetensors.md).
        metadata: safetensors only: the str -> str ``__metadata__`` of the header.
        clone_shared: safetensors only: store tensors that share memory as independent
            copies instead of refusing them (the default refuses, naming the keys).
        max_shard_size: save a model directory instead of a file: `obj` (a flat dict of
            str -> tensor) is split into shards of at most this many bytes (an int, or a str
            such as ``"5GB"``, ``"500MB"``, ``"10KiB"``) plus an index, named and laid out as
            ``huggingface_hub`` and ``transformers`` write them (``pytorch_model-00001-of-
            00002.bin`` or, with ``format="safetensors"``, ``model-00001-of-00002.safetensors``),
            tensors sharing memory kept as they keep them (torch: in one shard, still shared;
            safetensors: stored once). `f` is a directory path; the directory
            appears (or replaces an earlier checkpoint directory) atomically. Without
            max_shard_size an existing directory is refused (IsADirectoryError), as by
            torch.save. See docs/directories.md.
        manifest: a directory save only: also write ``ckptio.manifest.json``, the size and
            CRC-32 of every file of the directory, which ``load(..., verify=True)`` and
            ``ckptio verify`` check (docs/verify.md).
        storage_options: for an ``s3://`` URL: endpoint, credentials, retries... as for
            :func:`load` (docs/remote.md).

    Example::

        >>> ckptio.save(model.state_dict(), "model.pt")
        >>> model.load_state_dict(ckptio.load("model.pt"))
        >>> ckptio.save(model.state_dict(), "llm", max_shard_size="5GB", format="safetensors")
    """
    if max_shard_size is not None and _remote.is_url(f):
        raise NotImplementedError(
            f"{f}: saving a model directory to object storage is not supported yet; save "
            "each shard's URL"
        )
    upload = _upload.upload_for(f, storage_options, "save")
    if max_shard_size is not None:
        save_directory(
            obj,
            f,
            max_shard_size,
            format,
            metadata,
            clone_shared,
            get_options().durable,
            manifest,
            lambda shard, path, file_crc32: _save_torch(
                shard,
                path,
                None,
                pickle_module,
                pickle_protocol,
                _use_new_zipfile_serialization,
                _disable_byteorder_record,
                file_crc32=file_crc32,
            ),
        )
        return
    if manifest:
        raise ValueError(
            "manifest applies to a directory save (max_shard_size given); a torch file carries "
            "its records' CRC-32s (settings write_crc32)"
        )
    if format == "safetensors":
        _save_safetensors(obj, f, metadata, clone_shared, upload)
        return
    if format != "torch":
        raise ValueError(f"format must be 'torch' or 'safetensors', got {format!r}")
    if metadata is not None or clone_shared:
        raise ValueError("metadata and clone_shared apply only to format='safetensors'")
    _save_torch(
        obj,
        f,
        upload,
        pickle_module,
        pickle_protocol,
        _use_new_zipfile_serialization,
        _disable_byteorder_record,
    )


def _save_torch(
    obj: object,
    f: FileLike,
    upload: _upload.Upload | None,
    pickle_module: Any,
    pickle_protocol: int,
    _use_new_zipfile_serialization: bool,
    _disable_byteorder_record: bool,
    *,
    file_crc32: bool = False,
) -> int | None:
    """save() of the torch format. With `file_crc32`, returns the CRC-32 of the whole file,
    computed as it is written (_writer.save_object); None when torch writes the file (the
    legacy format, skip_data()) or into an upload."""
    tls = getattr(torch.serialization, "_serialization_tls", None)
    if not _use_new_zipfile_serialization or getattr(tls, "skip_data", False):
        # The legacy (pre-1.6) format has no layout to parallelize, and skip_data() writes
        # headers without payloads: torch writes both.
        def save_with_torch(target: Any) -> None:
            torch_save(
                obj,
                target,
                pickle_module,
                pickle_protocol,
                _use_new_zipfile_serialization=_use_new_zipfile_serialization,
                _disable_byteorder_record=_disable_byteorder_record,
            )

        if upload is None:
            save_with_torch(f)
        else:
            upload.write(save_with_torch)
        return None
    if not is_path(f) and not callable(getattr(f, "write", None)):
        raise TypeError(f"f must be a path or a writable binary file object, got {type(f)!r}")
    byteorder = None if _disable_byteorder_record else sys.byteorder
    name = archive_name_for(f)
    # Into a File (a path's temporary file), storages go out while the pickler runs; CUDA
    # ones through the staging ring. Into a file object (an upload's too), once the pickle is
    # complete.
    return _write(
        f,
        upload,
        lambda target: save_object(
            target,
            name,
            obj,
            pickle_module,
            pickle_protocol,
            byteorder=byteorder,
            file_crc32=file_crc32,
        ),
    )


def _write(f: FileLike, upload: _upload.Upload | None, write: Callable[[Any], _T]) -> _T | None:
    """`write(destination)` into `f` (_files.write_to), returning what it returns, or into
    the upload to `f`'s URL (None)."""
    if upload is None:
        return write_to(f, write, get_options().durable)
    upload.write(write)
    return None


def _save_safetensors(
    obj: Any,
    f: FileLike,
    metadata: Mapping[str, str] | None,
    clone_shared: bool,
    upload: _upload.Upload | None = None,
) -> None:
    if not is_path(f) and not callable(getattr(f, "write", None)):
        raise TypeError(f"f must be a path or a writable binary file object, got {type(f)!r}")
    layout = _safetensors.plan(obj, metadata, clone_shared)
    _write(f, upload, lambda target: _safetensors.write(target, layout))


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
    storage_options: Mapping[str, Any] | None = None,
    verify: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    **pickle_load_args: Any,
) -> Any:
    """Loads an object saved with :func:`save` or :func:`torch.save`, as :func:`torch.load`.

    A safetensors file (recognized by its bytes, whatever its name) loads too, through the
    same eager, mmap and map_location paths, as a dict of tensors (docs/safetensors.md).

    A model directory (or its ``*.index.json``) loads as the merged state dict of its shards
    (torch zip, legacy torch or safetensors, mixed if need be), in the index's order, every
    shard checked against the index and every storage of every shard read in one parallel
    plan (docs/directories.md).

    Args:
        f: a path (of a file, a model directory or an index) or a readable, seekable binary
            file object.
        map_location: None, a device string, a ``torch.device``, a dict mapping saved
            locations to new ones, or a callable ``(storage, location) -> storage``.
        pickle_module: only with ``weights_only=False``: the module whose ``Unpickler`` runs.
        weights_only: True (the default unless `pickle_module` is given) refuses every global
            torch's weights-only loader refuses: no code from the file runs. False runs the
            full unpickler; only for files you trust.
        mmap: map the file and return tensors that view it (zero-copy, copy-on-write) instead
            of reading it into memory. Needs a local path.
        storage_options: for ``s3://`` and ``http(s)://`` URLs: endpoint, credentials,
            retries... (docs/remote.md); refused for anything else.
        cache_dir: for URLs: a directory keeping a local copy of the object, validated
            by its ETag and size on every load (a hit reads the local file, and ``mmap``
            works); None takes the ``remote_cache_dir`` setting (docs/remote.md).
        verify: check every record's stored CRC-32 against the bytes read (with ``mmap``,
            every page of the data records is read); None takes the ``verify`` setting. A
            mismatch raises CheckpointError naming the file and the tensors; a file that
            recorded no CRCs loads with an ``UnverifiedWarning`` (docs/verify.md).
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
    if verify is not None and verify != get_options().verify:
        with options(verify=bool(verify)):
            return load(
                f,
                map_location,
                pickle_module,
                weights_only=weights_only,
                mmap=mmap,
                storage_options=storage_options,
                cache_dir=cache_dir,
                **pickle_load_args,
            )
    from ._remote import _cache

    hit = _cache.optimistic(
        f, storage_options, cache_dir, bool(_default_mmap() if mmap is None else mmap), "load"
    )
    if hit is not None:  # a cached copy, loaded while a thread checks it is current
        try:
            result, error = (
                load(hit.path, map_location, pickle_module, weights_only=weights_only,
                     mmap=mmap, **pickle_load_args),
                None,
            )  # fmt: skip
        except Exception as e:
            result, error = None, e
        if hit.valid():
            if error is not None:
                raise error
            return result
        del result, error  # stale: refilled below, then loaded
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

    f, storage_options = _cache.resolve(
        f, storage_options, cache_dir, "load", bool(mmap), hit.current if hit else None
    )
    remote = _remote.source_for(f, storage_options, "load", bool(mmap))
    if remote is None and _directory.is_directory_path(f):
        return _load_directory(
            _directory.resolve(f, storage_options, cache_dir),
            map_location,
            pickle_module,
            weights_only,
            bool(mmap),
            pickle_load_args,
        )
    shared = bool(mmap) and mmap_shared()
    start: int | None = None  # where a file object was read from, to hand it on to torch
    if remote is None and isinstance(f, (str, bytes, os.PathLike)):
        path = os.fsdecode(f)
        # A MAP_SHARED mapping writes through to the file, so it needs a writable descriptor.
        mode = _core.io.FileMode.READ_WRITE if shared else _core.io.FileMode.READ
        file: _core.io.File | None = _core.io.File.open(path, mode)
        source: Any = file
    elif remote is None:
        if mmap:
            raise ValueError("f must be a file path in order to use the mmap argument")
        # An open regular file: parallel preads, no copy in memory; any other object (BytesIO,
        # gzip.open...) is read through its own read() (_files.py).
        source, file, start = open_source(f)
    else:  # s3://, http(s):// (_remote): ranged GETs, never a mapping
        source = file = cast(Any, remote)
    try:
        head = source.pread(0, min(9, source.size))
        if _safetensors.looks_like_safetensors(head, source.size):
            # safetensors holds no code: weights_only and pickle arguments have nothing to do.
            mapping = _core.io.Mapping(file, shared) if file is not None and mmap else None
            checker = _safetensors_checker(f, source, remote is None)
            tensors = _safetensors.load(source, map_location, mapping)
            if checker is not None:
                checker.finish(source)  # the whole file against its manifest
            return tensors
        if not _core.zip.looks_like_zip(head[:4]):
            if get_options().verify:
                _verify.warn_unverified(source.name, "a legacy (pre-1.6) file has no checksums")
            return _load_legacy(
                source,
                # A file object is left where torch leaves it (legacy files are a stream).
                None if is_path(f) or remote is not None else for_torch(f, start),
                f if isinstance(f, str) else None,  # as torch's refusal names it
                map_location,
                pickle_module,
                weights_only,
                mmap,
                pickle_load_args,
            )
        # An eager load may take the payload offsets from the layout instead of each record's
        # local header (ArchiveReader's predict); they are checked before the result is kept.
        archive = ArchiveReader(source, predict=not mmap)

        def load_archive(archive: ArchiveReader) -> Any:
            if _needs_torch(archive):
                # A path or a file object is torch's to read again; an object in storage is
                # not fetched twice: torch reads the bytes of `source`.
                return _archive_with_torch(
                    archive,
                    for_torch(f, start) if remote is None else _whole(source),
                    map_location,
                    pickle_module,
                    weights_only,
                    mmap,
                    pickle_load_args,
                )
            check_version(archive)
            mapping = _core.io.Mapping(file, shared) if file is not None and mmap else None
            return _unpickle(
                archive, map_location, mapping, weights_only, pickle_module, pickle_load_args
            )

        return _with_predictions(
            [archive], lambda: load_archive(archive), lambda: load_archive(archive.reopen())
        )
    finally:
        if file is not None:
            file.close()


def _with_predictions(
    archives: Sequence[ArchiveReader], load: Callable[[], _T], again: Callable[[], _T]
) -> _T:
    """``load()``, kept only once the predicted payload offsets of `archives` (if any:
    ArchiveReader's predict; the list may grow while `load` runs) are checked against the
    real local headers. If one was wrong, the result (or the error it led to) is dropped
    and ``again()`` reads the archives with every header read."""
    try:
        result = load()
    except Exception:
        if _predictions_hold(archives):
            raise
    else:
        if _predictions_hold(archives):
            return result
        del result
    return again()


def _predictions_hold(archives: Iterable[ArchiveReader]) -> bool:
    try:
        for archive in archives:
            archive.check_predictions()
    except Mispredicted:
        return False
    return True


def _safetensors_checker(f: Any, source: Any, local: bool) -> _verify.FileChecker | None:
    """With ``verify`` on: the checker of a safetensors file's whole-file CRC-32 from the
    manifest beside it (``<file>.ckptio.manifest.json``), attached to `source`; None, with
    an UnverifiedWarning, when no manifest lists it (the format has no checksums)."""
    if not get_options().verify:
        return None
    checker = None
    if local and isinstance(f, (str, bytes, os.PathLike)):
        path = os.fsdecode(f)
        listed = _verify.listed_in_manifest(path)
        checker = _verify.attach_file_checker(source, os.path.basename(path), listed)
    if checker is None:
        _verify.warn_unverified(
            source.name,
            "a safetensors file has no checksums and no manifest "
            f"(<file>{_verify.MANIFEST_SUFFIX}) lists it",
        )
    return checker


def _unpickle(
    archive: ArchiveReader,
    map_location: Any,
    mapping: Any,
    weights_only: bool,
    pickle_module: Any,
    pickle_load_args: dict[str, Any],
) -> Any:
    loader = StorageLoader(archive, map_location, mapping)
    result: Any = None
    try:
        # Meta tensors hold no data to check (torch.load's check fails on them).
        with torch_load_state(map_location, validate=not loader.is_meta):
            result = _unpickle_pending(
                archive, loader, weights_only, pickle_module, pickle_load_args
            )
            loader.flush()
    except _verify.CorruptRecord as e:
        raise _verify.name_tensors(e, result, loader.loaded) from None
    finally:
        loader.join_prefetch()  # a failed load leaves no read running
    return result


def _unpickle_pending(
    archive: ArchiveReader,
    loader: StorageLoader,
    weights_only: bool,
    pickle_module: Any,
    pickle_load_args: dict[str, Any],
) -> Any:
    """data.pkl of `archive` unpickled through `loader`; storages whose reads were deferred
    are still waiting in ``loader.reads`` (the caller flushes)."""
    unpickler = make_unpickler(
        archive.read("data.pkl"),
        loader,
        weights_only=weights_only,
        pickle_module=pickle_module,
        **{"encoding": "utf-8", **pickle_load_args},
    )
    try:
        with gc_paused():
            result = unpickler.load()
            # The memo holds every object of the pickle; free what the result does not
            # keep (storage wrappers, argument tuples) while the collector is paused.
            unpickler.memo.clear()
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
    return result


def _load_directory(
    layout: _directory.Layout,
    map_location: Any,
    pickle_module: Any,
    weights_only: bool,
    mmap: bool,
    pickle_load_args: dict[str, Any],
) -> dict[str, Any]:
    """The merged state dict of a model directory (or index file), docs/directories.md.

    Every shard's container is parsed and unpickled first (each checked against the index),
    then the storages of all of them are read as one plan: host memory in one parallel batch
    over every file, device memory through one staging target per device. Shards ckptio
    hands to torch (legacy, TorchScript, byte-swapped) are loaded whole on their own, from
    the file already open (a shard is opened once). An eager load predicts the payload
    offsets of a zip shard out of the page cache (or in object storage) as a single file's
    load does, and reads the whole directory again with every local header read if one
    prediction was wrong (:func:`_with_predictions`).
    """
    shared = mmap and mmap_shared()
    mode = _core.io.FileMode.READ_WRITE if shared else _core.io.FileMode.READ
    placement = Placement(map_location, layout.name)
    files: list[Any] = []  # File, or RemoteSource in object storage
    loaders: list[StorageLoader] = []  # of every pass, all joined at the end
    archives: list[ArchiveReader] = []  # of the first pass, whose predictions are checked
    # verify: the directory's manifest (ckptio.manifest.json) checks each file it lists whole,
    # from the reads of it; other files are checked by their records' CRC-32s, if any.
    verify = get_options().verify
    listed = _verify.listed_in_manifest(layout.root) if verify and not layout.remote else None

    def read_all(predict: bool, warn: bool = True) -> list[tuple[str, Mapping[str, Any]]]:
        """Every shard's tensors, with the payload offsets of zip shards predicted where
        `predict` allows; `warn`: the UnverifiedWarnings (the first pass only)."""
        held: list[tuple[str, Mapping[str, Any]]] = []
        whole_files: list[tuple[_verify.FileChecker, _core.io.File]] = []
        pass_loaders: list[StorageLoader] = []
        for shard, file in zip(layout.shards, files, strict=True):
            path = layout.path(shard)
            whole = _verify.attach_file_checker(file, shard, listed) if verify else None
            if whole is not None:
                whole_files.append((whole, file))
            unverified = warn and verify and whole is None
            mapping = _core.io.Mapping(file, shared) if mmap else None
            head = file.pread(0, min(9, file.size))
            archive = None
            if _core.zip.looks_like_zip(head[:4]):
                with options(verify=verify and whole is None):
                    # its records' CRCs, if not the file's
                    archive = ArchiveReader(file, predict=predict)
                if predict:
                    archives.append(archive)
            if _safetensors.looks_like_safetensors(head, file.size):
                if unverified:
                    _verify.warn_unverified(
                        path,
                        "a safetensors shard has no checksums and the directory's "
                        f"{_verify.MANIFEST_NAME} does not list it",
                    )
                header = _safetensors.read_header(file)
                records = _safetensors.SafetensorsRecords(file, header)
                loader = StorageLoader(records, map_location, mapping, placement)
                loaders.append(loader)
                pass_loaders.append(loader)
                tensors: Any = _safetensors.load_pending(loader, header)
            elif archive is not None and not _needs_torch(archive):
                check_version(archive)
                loader = StorageLoader(archive, map_location, mapping, placement)
                loaders.append(loader)
                pass_loaders.append(loader)
                tensors = _unpickle_pending(
                    archive, loader, weights_only, pickle_module, pickle_load_args
                )
            elif archive is not None:  # torch reads it: by its path, or its bytes
                local = file.name if isinstance(file, _core.io.File) else None
                tensors = _archive_with_torch(
                    archive,
                    local if local is not None else _whole(file),
                    map_location,
                    pickle_module,
                    weights_only,
                    mmap,
                    pickle_load_args,
                )
            else:
                if unverified:
                    _verify.warn_unverified(
                        path,
                        "a legacy (pre-1.6) shard has no checksums and the directory's "
                        f"{_verify.MANIFEST_NAME} does not list it",
                    )
                tensors = _load_legacy(
                    file,
                    None,
                    path if not layout.remote else None,
                    map_location,
                    pickle_module,
                    weights_only,
                    mmap,
                    pickle_load_args,
                )
            tensors = _directory.shard_tensors(layout, shard, tensors)
            _directory.check_shard_names(layout, shard, tensors)
            held.append((shard, tensors))
        reads = ReadBatch(None)
        for loader in pass_loaders:
            loader.wait_prefetch()
            reads.absorb(loader.reads)
        reads.run()  # every shard's storages, one plan
        for whole, file in whole_files:
            whole.finish(file)  # each file listed in the manifest, whole
        return held

    def read_again() -> list[tuple[str, Mapping[str, Any]]]:
        for archive in archives:
            archive.forget_predictions()
        return read_all(predict=False, warn=False)

    try:
        with torch_load_state(map_location, validate=not placement.is_meta):
            files = layout.open_all(mode)
            if mmap and not all(isinstance(file, _core.io.File) for file in files):
                raise ValueError(
                    f"{layout.name}: mmap=True needs local files; the shards of a remote "
                    "directory are mapped from a local cache (cache_dir=, docs/remote.md)"
                )
            held = _with_predictions(archives, lambda: read_all(predict=not mmap), read_again)
    finally:
        for loader in loaders:
            loader.join_prefetch()  # a failed load leaves no read running
        for file in files:
            file.close()
    return _directory.merge(layout, held)


def _needs_torch(archive: ArchiveReader) -> bool:
    """TorchScript archives, byte-swapped files and loads under a FakeTensorMode: torch's own
    loader reads them."""
    return (
        archive.has("constants.pkl")
        or not _plain_byteorder(archive)
        or torch._guards.detect_fake_mode(None) is not None
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


def _whole(source: Any) -> io.BytesIO:
    """The bytes of `source`, read once, as a file object for torch's own loaders."""
    return io.BytesIO(source.pread(0, source.size))


def _archive_with_torch(
    archive: ArchiveReader,
    f: Any,
    map_location: Any,
    pickle_module: Any,
    weights_only: bool,
    mmap: bool,
    pickle_load_args: dict[str, Any],
) -> Any:
    """torch.load of `f`, the file of `archive` (a TorchScript archive, a byte-swapped file,
    or any file under a FakeTensorMode: _needs_torch), its data.pkl checked first."""
    pickles = []
    if archive.has("data.pkl") and not archive.has("constants.pkl"):
        pickles.append(archive.read("data.pkl"))
    return _load_with_torch(
        f,
        map_location,
        pickle_module,
        weights_only,
        mmap,
        pickle_load_args,
        archive.name,
        pickles,
    )


def _load_legacy(
    source: Any,
    stream: Any,
    path: str | None,
    map_location: Any,
    pickle_module: Any,
    weights_only: bool,
    mmap: bool,
    pickle_load_args: dict[str, Any],
) -> Any:
    """A legacy (pre-1.6 / _use_new_zipfile_serialization=False) file: its bytes, read whole
    from `source` once, are checked and handed to torch's own parser (under the same
    weights_only rules). torch reads the caller's file object `stream` (rewound), which it
    leaves after the file as a stream; with `stream` None (a path, an object in storage, a
    shard), the bytes checked, so that it never reads the file or the object again. `path`:
    the path the caller named, for torch's mmap refusal."""
    name = source.name
    data = source.pread(0, source.size)
    # Legacy files start with a pickled magic number (protocol 2: 0x80 0x02); anything else
    # is not a checkpoint.
    head = data[:4]
    if len(head) < 2 or head[0] != 0x80:
        raise CheckpointError(
            f"{name}: not a torch checkpoint (neither a zip archive nor a "
            f"legacy torch file; it starts with {head!r})"
        )
    legacy_pickles = check_legacy(data, name)
    if mmap:
        # torch's refusal, word for word: the file is valid, mmap needs another format.
        f_name = f"{path}, " if path is not None else ""
        raise RuntimeError(
            "mmap can only be used with files saved with "
            f"`torch.save({f_name}_use_new_zipfile_serialization=True), "
            "please torch.save your checkpoint with this option in order to use mmap."
        )
    view = memoryview(data)
    return _load_with_torch(
        io.BytesIO(data) if stream is None else stream,
        map_location,
        pickle_module,
        weights_only,
        False,
        pickle_load_args,
        name,
        [view[p.start : p.end] for p in legacy_pickles],
    )
