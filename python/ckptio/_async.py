"""``async_save``: a save that returns as soon as the state has been copied.

The caller's thread pickles the object (so containers, numbers and strings are captured as
they are now) and copies every storage into one staging buffer: pinned host memory when a
storage lives on a GPU, plain host memory otherwise. GPU copies are issued on each device's
current stream (after the kernels already queued there, so their results are what is saved);
the call then waits for an event recorded after them, not for the whole device, so the
training job's other streams keep running. A background thread then writes the
file exactly as :func:`ckptio.save` would (the C++ writer releases the GIL). Staging buffers
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

from . import _core
from ._archive import archive_name_for
from ._files import is_path, write_to
from ._pickler import dumps
from ._remote import _upload
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
        storage_options: for an ``s3://`` URL, as :func:`ckptio.save`.

    Returns:
        A :class:`concurrent.futures.Future` whose ``result()`` is None once the file is
        complete (renamed into place, and fsynced with ``durable``), or raises the write's
        error (e.g. ``OSError``). Errors while taking the snapshot (an object that cannot be
        pickled, a bad argument) raise from ``async_save`` itself.

    Saves to the same path (or file object) complete in call order; saves to different
    paths may overlap. At most ``async_max_pending`` saves are in flight: one more waits
    here for the oldest to finish. Saves still pending at interpreter exit are completed.

    Example::

        >>> fut = ckptio.async_save(model.state_dict(), "step100.pt")
        >>> optimizer.step()  # modifies the parameters: the file keeps the old values
        >>> fut.result()      # raises if the write failed
    """
    upload = _upload.upload_for(f, storage_options, "async_save")
    if not is_path(f) and not callable(getattr(f, "write", None)):
        raise TypeError(f"f must be a path or a writable binary file object, got {type(f)!r}")
    opts = get_options()
    limit = opts.async_max_pending
    key: object = os.path.realpath(os.fsdecode(f)) if is_path(f) else id(f)  # type: ignore[arg-type]
    if upload is not None:
        key = upload.url
    target = os.fsdecode(f) if is_path(f) else repr(f)  # type: ignore[arg-type]
    tls = getattr(torch.serialization, "_serialization_tls", None)
    if not _use_new_zipfile_serialization or getattr(tls, "skip_data", False):
        # Formats only torch writes (legacy, skip_data): saved now, after any pending save
        # to the same target (call order), and the future is done.
        _scheduler.wait_for_target(key)
        future = SaveFuture(target)
        future._observed = True  # the caller sees any error right here
        save(
            obj,
            f,
            pickle_module,
            pickle_protocol,
            _use_new_zipfile_serialization=_use_new_zipfile_serialization,
            _disable_byteorder_record=_disable_byteorder_record,
            storage_options=storage_options,
        )
        future.set_result(None)
        return future

    pickle_bytes, storages = dumps(obj, pickle_module, pickle_protocol)
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
    del storages
    future = SaveFuture(target)
    name = archive_name_for(f)
    byteorder = None if _disable_byteorder_record else sys.byteorder

    def archive(target: Any) -> None:
        write_torch_archive(target, name, pickle_bytes, payloads, byteorder=byteorder)

    def write() -> None:
        try:
            with options(**_as_changes(opts)):
                if upload is None:
                    write_to(f, archive, opts.durable)
                else:
                    upload.write(archive)
        finally:
            _scheduler.release(buffer, limit)

    try:
        _scheduler.submit(key, future, write)
    except BaseException:
        _scheduler.release(buffer, limit)
        raise
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
