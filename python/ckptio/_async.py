"""``async_save``: a save that returns as soon as the state has been copied.

The caller's thread pickles the object (so containers, numbers and strings are captured as
they are now) and copies every storage into one staging buffer: pinned host memory when a
storage lives on a GPU, plain host memory otherwise. GPU copies are issued on each device's
current stream (after the kernels already queued there, so their results are what is saved);
the call then waits for an event recorded after them, not for the whole device, so the
training job's other streams keep running. A background thread then writes the
file exactly as :func:`ckptio.save` would (the C++ writer releases the GIL). A model directory
(``max_shard_size``) and a safetensors file are written from the state dict rebuilt over the
staged copies (tensors that shared a storage share its copy), by save's own writers. Staging buffers
are reused between saves; at most ``async_max_pending`` saves are in flight, and the buffers
kept between saves never outnumber that bound.

Saves to the same target are written in the order they were made; saves to different targets
overlap. Errors of the write surface on the returned future's ``result()``.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import ctypes
import dataclasses
import os
import pickle
import sys
import threading
import warnings
from typing import IO, Any, Callable, Mapping, Union

import torch

from . import _core, _safetensors
from ._archive import archive_name_for
from ._files import is_path, write_to
from ._pickler import dumps
from ._remote import _upload, is_url
from ._shard_writer import parse_size, plan_directory, save_directory
from ._staging import completion_event
from ._writer import write_torch_archive
from .serialization import DEFAULT_PROTOCOL, save
from .settings import Options, get_options, options

__all__ = ["SaveFuture", "async_save", "wait_all"]

FileLike = Union[str, os.PathLike, IO[bytes]]
_ALIGN = 64  # of each storage's copy in the staging buffer


class SaveFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """The future of one :func:`async_save`: ``result()`` returns None once the file is
    complete, or raises what the write raised. A failure nobody asked about is reported on
    stderr when the interpreter exits."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self._observed = False

    def result(self, timeout: float | None = None) -> None:
        self._observed = True
        return super().result(timeout)  # type: ignore[no-any-return]

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._observed = True
        return super().exception(timeout)

    def add_done_callback(self, fn: Callable[[Any], object]) -> None:
        self._observed = True
        super().add_done_callback(fn)


class _StagingBuffer:
    """One block of host memory (pinned when `pinned`) that holds a save's storages."""

    def __init__(self, nbytes: int, pinned: bool) -> None:
        self.nbytes = nbytes
        self.pinned = pinned
        self.memory: Any
        if pinned:  # GPU copies land here: page-locked, so they run as DMA
            self.memory = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
            self.address = self.memory.data_ptr()
        else:  # aligned host memory, huge pages when allowed (fewer first-touch faults)
            self.memory = _core.io.HostBuffer(nbytes, get_options().huge_pages)
            self.address = self.memory.address

    def view(self, offset: int, n: int) -> torch.Tensor:
        """A uint8 tensor over [offset, offset + n) of the buffer."""
        if self.pinned:
            return self.memory[offset : offset + n]
        with warnings.catch_warnings():  # the buffer is writable; torch warns regardless
            warnings.simplefilter("ignore")
            return torch.frombuffer(self.memory, dtype=torch.uint8, count=n, offset=offset)

    def storage(self, offset: int, n: int) -> torch.UntypedStorage:
        """A storage of exactly the `n` bytes at `offset` (not the whole buffer's storage, as
        a view of :attr:`memory` would have), which keeps the buffer's memory alive."""
        if self.pinned:
            region = self.memory.numpy()[offset : offset + n]
            return torch.from_numpy(region).untyped_storage()
        return self.view(offset, n).untyped_storage()


class _Scheduler:
    """Staging buffers, the in-flight bound, per-target ordering and the writer threads."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._in_flight = 0
        self._idle: list[_StagingBuffer] = []
        self._last: dict[object, SaveFuture] = {}  # target key -> latest save to it
        self._unfinished: set[SaveFuture] = set()
        self._failed: list[SaveFuture] = []
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.buffers_allocated = 0  # counters for tests and docs
        self.buffers_reused = 0

    # -- staging buffers --------------------------------------------------------------------
    def acquire(self, nbytes: int, pinned: bool, limit: int) -> _StagingBuffer | None:
        """Waits until fewer than `limit` saves are in flight, then returns a buffer of at
        least `nbytes` (None for an empty save). Counts the caller as in flight."""
        with self._cond:
            while self._in_flight >= limit:
                self._cond.wait()
            self._in_flight += 1
            if nbytes == 0:
                return None
            fitting = [b for b in self._idle if b.nbytes >= nbytes and (b.pinned or not pinned)]
            if fitting:
                best = min(fitting, key=lambda b: b.nbytes)
                self._idle.remove(best)
                self.buffers_reused += 1
                return best
            # Nothing fits: free the idle buffers rather than hold more memory than the bound.
            self._idle.clear()
        try:
            buffer = _StagingBuffer(nbytes, pinned)
        except BaseException:
            self.release(None, limit)
            raise
        with self._cond:
            self.buffers_allocated += 1
        return buffer

    def release(self, buffer: _StagingBuffer | None, limit: int) -> None:
        with self._cond:
            self._in_flight -= 1
            if buffer is not None:
                self._idle.append(buffer)
                # Keep at most `limit` buffers in all (in flight + idle); drop the smallest.
                self._idle.sort(key=lambda b: b.nbytes, reverse=True)
                del self._idle[max(0, limit - self._in_flight) :]
            self._cond.notify_all()

    def clear(self) -> None:
        """Frees the idle staging buffers."""
        with self._cond:
            self._idle.clear()

    # -- ordering and threads ---------------------------------------------------------------
    def submit(self, key: object, future: SaveFuture, write: Callable[[], None]) -> None:
        with self._cond:
            previous = self._last.get(key)
            self._last[key] = future
            self._unfinished.add(future)
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=64, thread_name_prefix="ckptio-async-save"
                )
            executor = self._executor

        def run() -> None:
            if previous is not None:
                concurrent.futures.wait([previous])  # same target: keep the order
            failed = False
            try:
                write()
            except BaseException as e:
                failed = True
                future.set_exception(e)
            else:
                future.set_result(None)
            finally:
                with self._cond:
                    if self._last.get(key) is future:
                        del self._last[key]
                    self._unfinished.discard(future)
                    if failed:  # kept for the report at exit unless someone looks
                        self._failed = [f for f in self._failed if not f._observed]
                        self._failed.append(future)
                    self._cond.notify_all()

        try:
            executor.submit(run)
        except BaseException:  # e.g. called while the interpreter shuts down
            with self._cond:
                if self._last.get(key) is future:
                    if previous is None:
                        del self._last[key]
                    else:
                        self._last[key] = previous
                self._unfinished.discard(future)
                self._cond.notify_all()
            raise

    def wait_for_target(self, key: object) -> None:
        with self._cond:
            previous = self._last.get(key)
        if previous is not None:
            concurrent.futures.wait([previous])

    def wait_all(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._unfinished, timeout)

    def report_unobserved_failures(self) -> None:
        with self._cond:
            failed = [f for f in self._failed if not f._observed]
            self._failed.clear()
        for f in failed:
            e = super(SaveFuture, f).exception()
            sys.stderr.write(
                f"ckptio: async_save to {f.target} failed and its result was never "
                f"checked: {type(e).__name__}: {e}\n"
            )


_scheduler = _Scheduler()
# concurrent.futures joins its threads (finishing every queued save) before atexit handlers
# run; this one then reports the failures nobody looked at.
atexit.register(_scheduler.report_unobserved_failures)


def async_save(
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
) -> SaveFuture:
    """Saves `obj` to `f` like :func:`ckptio.save`, writing in a background thread.

    Returns once a consistent snapshot has been taken: the object is pickled and every
    storage copied (GPU storages into pinned host memory). From then on the caller may
    modify or free its tensors and containers; the file holds their values as of the call.

    Args:
        obj, f, pickle_module, pickle_protocol: as :func:`ckptio.save`. A file object must not
            be used by the caller until the future is done. An ``s3://bucket/key`` URL is
            uploaded in the background (docs/remote.md, "Saving").
        format, metadata, clone_shared: as :func:`ckptio.save`. A safetensors file is written
            from a snapshot of its tensors, byte for byte what ``save`` writes.
        max_shard_size, manifest: as :func:`ckptio.save`: `f` is a model directory, written
            in the background exactly as ``save(..., max_shard_size=...)`` writes it (the same
            shards and index, swapped into place atomically; docs/directories.md, "Saving in
            the background"). The snapshot holds one copy of each storage, and tensors that
            share a storage share its copy, so tied tensors are kept as ``save`` keeps them.
        storage_options: for an ``s3://`` URL, as :func:`ckptio.save`.

    Returns:
        A :class:`concurrent.futures.Future` whose ``result()`` is None once the file (or
        directory) is complete (renamed into place, and fsynced with ``durable``), or raises
        the write's error (e.g. ``OSError``; for a directory also what ``save`` refuses about
        the path as it then is, e.g. a directory holding other files). Errors while taking
        the snapshot (an object that cannot be pickled, a bad argument, a state dict a
        directory or a safetensors file cannot hold) raise from ``async_save`` itself.

    Saves to the same path (or file object) complete in call order; saves to different
    paths may overlap. At most ``async_max_pending`` saves are in flight: one more waits
    here for the oldest to finish. Saves still pending at interpreter exit are completed.

    Example::

        >>> fut = ckptio.async_save(model.state_dict(), "step100.pt")
        >>> optimizer.step()  # modifies the parameters: the file keeps the old values
        >>> fut.result()      # raises if the write failed
        >>> ckptio.async_save(model.state_dict(), "llm", max_shard_size="5GB", format="safetensors")
    """
    opts = get_options()
    key: object = os.path.realpath(os.fsdecode(f)) if is_path(f) else id(f)  # type: ignore[arg-type]
    target = os.fsdecode(f) if is_path(f) else repr(f)  # type: ignore[arg-type]

    def save_now() -> None:
        save(
            obj,
            f,
            pickle_module,
            pickle_protocol,
            _use_new_zipfile_serialization=_use_new_zipfile_serialization,
            _disable_byteorder_record=_disable_byteorder_record,
            format=format,
            metadata=metadata,
            clone_shared=clone_shared,
            max_shard_size=max_shard_size,
            manifest=manifest,
            storage_options=storage_options,
        )

    if max_shard_size is not None:
        if is_url(f) or not is_path(f) or clone_shared:
            # save refuses these before it writes anything (a directory goes to a local path;
            # clone_shared is a file save's option): its own error is raised here.
            return _save_now(key, target, save_now)
        return _save_directory(
            obj,
            f,
            key,
            target,
            opts,
            max_shard_size,
            format,
            metadata,
            manifest,
            pickle_module,
            pickle_protocol,
            None if _disable_byteorder_record else sys.byteorder,
        )
    upload = _upload.upload_for(f, storage_options, "async_save")
    if not is_path(f) and not callable(getattr(f, "write", None)):
        raise TypeError(f"f must be a path or a writable binary file object, got {type(f)!r}")
    if upload is not None:
        key = upload.url
    if format == "safetensors" and not manifest:
        _safetensors.plan(obj, metadata, clone_shared)  # save's checks, raised here
        kept = None if metadata is None else dict(metadata)
        buffer, snapshot, _ = _stage_tensors(obj, [], opts)  # type: ignore[arg-type]

        def write_safetensors() -> None:
            save(
                snapshot,
                f,
                format="safetensors",
                metadata=kept,
                clone_shared=clone_shared,
                storage_options=storage_options,
            )

        return _submit(key, target, opts, buffer, write_safetensors)
    tls = getattr(torch.serialization, "_serialization_tls", None)
    if (
        format != "torch"
        or metadata is not None
        or clone_shared
        or manifest
        or not _use_new_zipfile_serialization
        or getattr(tls, "skip_data", False)
    ):
        # Formats only torch writes (legacy, skip_data) are saved now, after any pending save
        # to the same target (call order), and the future is done; so are the arguments save
        # refuses for a torch file, which raise here.
        return _save_now(key, target, save_now)

    pickle_bytes, storages = dumps(obj, pickle_module, pickle_protocol)
    buffer, payloads = _stage(storages, opts)
    del storages
    name = archive_name_for(f)
    byteorder = None if _disable_byteorder_record else sys.byteorder

    def archive(target: Any) -> None:
        write_torch_archive(target, name, pickle_bytes, payloads, byteorder=byteorder)

    def write() -> None:
        if upload is None:
            write_to(f, archive, opts.durable)
        else:
            upload.write(archive)

    return _submit(key, target, opts, buffer, write)


def _save_directory(
    state_dict: Any,
    f: FileLike,
    key: object,
    target: str,
    opts: Options,
    max_shard_size: int | str,
    format: str,
    metadata: Mapping[str, str] | None,
    manifest: bool,
    pickle_module: Any,
    pickle_protocol: int,
    byteorder: str | None,
) -> SaveFuture:
    """async_save of a model directory. Checked now as save_directory checks it (the plan of
    the caller's state dict, every safetensors shard's layout). Torch shards are pickled now,
    from the caller's tensors, as the file path pickles; every storage is copied into the
    staging buffer and the state dict rebuilt over those copies. The background thread runs
    save_directory on that snapshot, its torch shards written from the pickles made here."""
    plan = plan_directory(state_dict, parse_size(max_shard_size), format, metadata)
    pickles: dict[str, tuple[bytes, list[torch.UntypedStorage]]] = {}
    if plan.format == "safetensors":
        for tensors in plan.shards.values():  # save_directory's check of every shard
            _safetensors.plan(tensors, plan.file_metadata)
    else:
        pickles = {
            name: dumps(tensors, pickle_module, pickle_protocol)
            for name, tensors in plan.shards.items()
        }
    more = [s for _, storages in pickles.values() for s in storages]
    del plan
    buffer, snapshot, payload_of = _stage_tensors(state_dict, more, opts)
    archives = {
        name: (data, [payload_of[_region(s)] for s in storages])
        for name, (data, storages) in pickles.items()
    }
    del pickles, more
    kept = None if metadata is None else dict(metadata)

    def save_torch_shard(
        tensors: dict[str, torch.Tensor], file: str, file_crc32: bool
    ) -> int | None:
        data, payloads = archives[os.path.basename(file)]
        name = archive_name_for(file)

        def archive(destination: Any) -> int | None:
            return write_torch_archive(
                destination, name, data, payloads, byteorder=byteorder, file_crc32=file_crc32
            )

        return write_to(file, archive, get_options().durable)

    def write() -> None:
        save_directory(
            snapshot,
            f,
            max_shard_size,
            format,
            kept,
            False,
            get_options().durable,
            manifest,
            save_torch_shard,
        )

    return _submit(key, target, opts, buffer, write)


_Region = tuple[torch.device, int, int]


def _region(storage: torch.UntypedStorage) -> _Region:
    """The memory a storage covers: (device, address, bytes); one staged copy each."""
    if storage.device.type == "meta":
        return storage.device, 0, 0
    return storage.device, storage.data_ptr(), storage.nbytes()


def _stage_tensors(
    tensors: Mapping[str, torch.Tensor], more: list[torch.UntypedStorage], opts: Options
) -> tuple[_StagingBuffer | None, dict[str, torch.Tensor], dict[_Region, Any]]:
    """Copies the storages of `tensors` (and `more`) into a staging buffer, one copy per
    region of memory; returns the buffer, `tensors` rebuilt over those copies (same dtypes,
    sizes, strides and storage offsets; tensors that shared a storage share its copy, each
    copy the size of its storage; meta tensors as they are) and each region's payload."""
    storages = [t.untyped_storage() for t in tensors.values()]
    regions: dict[_Region, torch.UntypedStorage] = {}
    for storage in [*storages, *more]:
        regions.setdefault(_region(storage), storage)
    buffer, payloads = _stage(list(regions.values()), opts)
    payload_of = dict(zip(regions, payloads, strict=True))
    copies: dict[int, torch.UntypedStorage] = {}  # original storage (_cdata) -> its copy
    snapshot: dict[str, torch.Tensor] = {}
    for (name, t), storage in zip(tensors.items(), storages, strict=True):
        if t.device.type == "meta":
            snapshot[name] = t
            continue
        copy = copies.get(storage._cdata)
        if copy is None:
            payload = payload_of[_region(storage)]
            if isinstance(payload, tuple) and buffer is not None:
                copy = buffer.storage(payload[0] - buffer.address, payload[1])
            else:
                copy = torch.UntypedStorage(0)
            copies[storage._cdata] = copy
        view = torch.empty(0, dtype=t.dtype)
        snapshot[name] = view.set_(copy, t.storage_offset(), t.size(), t.stride())
    return buffer, snapshot, payload_of


def _stage(
    storages: list[torch.UntypedStorage], opts: Options
) -> tuple[_StagingBuffer | None, list[Any]]:
    """Takes a staging buffer (waiting while ``async_max_pending`` saves are in flight) and
    copies `storages` into it; returns it and each storage's payload (:func:`_snapshot`).
    Returns once GPU copies are complete; on an error the buffer goes back first."""
    limit = opts.async_max_pending
    sizes = [s.nbytes() if s.device.type != "meta" else 0 for s in storages]
    offsets = []
    total = 0
    for n in sizes:
        offsets.append(total)
        total += -(-n // _ALIGN) * _ALIGN
    on_gpu = [s.device for s in storages if s.device.type == "cuda"]
    pinned = bool(on_gpu) and torch.cuda.is_available()
    buffer = _scheduler.acquire(total, pinned, limit)
    try:
        try:
            payloads = _snapshot(storages, sizes, offsets, buffer, opts.threads)
        except BaseException:
            # Copies queued before the failure must not land in a buffer that goes back to
            # the scheduler (and to the next save).
            _wait_for_copies(set(on_gpu), quiet=True)
            raise
        _wait_for_copies(set(on_gpu))  # the copies are complete: the caller may go on
    except BaseException:
        _scheduler.release(buffer, limit)
        raise
    return buffer, payloads


def _submit(
    key: object,
    target: str,
    opts: Options,
    buffer: _StagingBuffer | None,
    write: Callable[[], None],
) -> SaveFuture:
    """Schedules `write` (run under the caller's options `opts`) after the pending saves to
    `key`; `buffer` goes back to the scheduler once it has run."""
    limit = opts.async_max_pending

    def run() -> None:
        try:
            with options(**_as_changes(opts)):
                write()
        finally:
            _scheduler.release(buffer, limit)

    future = SaveFuture(target)
    try:
        _scheduler.submit(key, future, run)
    except BaseException:
        _scheduler.release(buffer, limit)
        raise
    return future


def _save_now(key: object, target: str, call: Callable[[], None]) -> SaveFuture:
    """Runs `call` (a synchronous save) after the pending saves to `key`; returns its future,
    already done: its errors raise here."""
    _scheduler.wait_for_target(key)
    future = SaveFuture(target)
    future._observed = True  # the caller sees any error right here
    call()
    future.set_result(None)
    return future


def _snapshot(
    storages: list[torch.UntypedStorage],
    sizes: list[int],
    offsets: list[int],
    buffer: _StagingBuffer | None,
    threads: int,
) -> list[Any]:
    """Copies each storage into `buffer`; returns the (address, nbytes) payloads. Host
    copies are cut into pieces of at most _COPY_PIECE bytes spread over `threads` threads
    (memmove releases the GIL)."""
    payloads: list[Any] = []
    host_copies: list[tuple[int, int, int]] = []  # (destination, source, nbytes)
    for storage, n, offset in zip(storages, sizes, offsets, strict=True):
        if n == 0 or buffer is None:
            payloads.append(b"")
            continue
        if storage.device.type == "cpu":
            # memmove, not Tensor.copy_: on the development VM copy_ between byte views moved
            # host memory ~10x slower.
            src, dst = storage.data_ptr(), buffer.address + offset
            for start in range(0, n, _COPY_PIECE):
                host_copies.append((dst + start, src + start, min(_COPY_PIECE, n - start)))
        else:
            source = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
            buffer.view(offset, n).copy_(source, non_blocking=source.is_cuda)
        payloads.append((buffer.address + offset, n))
    total = sum(c[2] for c in host_copies)
    if threads <= 1 or total < 2 * _COPY_PIECE:
        for dst, src, n in host_copies:
            ctypes.memmove(dst, src, n)
    else:
        pool = _copy_pool(threads)
        list(pool.map(lambda c: ctypes.memmove(*c), host_copies))
    return payloads


def _wait_for_copies(devices: set[torch.device], *, quiet: bool = False) -> None:
    """Waits for the device->host copies :func:`_snapshot` issued: they ran on each device's
    current stream, so an event recorded there after them marks their end. Blocking events:
    the thread sleeps while it waits. Not ``torch.cuda.synchronize``, which would also wait
    for every other stream of the process. `quiet`: on an error path, a failing wait raises
    nothing (the first error is on its way)."""
    events = []
    try:
        for device in devices:
            event = completion_event()
            event.record(torch.cuda.current_stream(device))
            events.append(event)
        for event in events:
            event.synchronize()
    except Exception:
        if not quiet:
            raise


_COPY_PIECE = 16 << 20
_copy_pools: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_copy_pools_lock = threading.Lock()


def _copy_pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    with _copy_pools_lock:
        pool = _copy_pools.get(threads)
        if pool is None:
            pool = _copy_pools[threads] = concurrent.futures.ThreadPoolExecutor(
                max_workers=threads, thread_name_prefix="ckptio-stage"
            )
        return pool


def _flush(f: Any) -> None:
    flush = getattr(f, "flush", None)
    if callable(flush):
        flush()


def _as_changes(opts: Options) -> dict[str, Any]:
    return {field.name: getattr(opts, field.name) for field in dataclasses.fields(opts)}


def wait_all(timeout: float | None = None) -> bool:
    """Waits for every pending :func:`async_save`; False if `timeout` expired first."""
    return _scheduler.wait_all(timeout)
