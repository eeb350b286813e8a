"""The staging pipeline: file <-> device memory through a ring of (pinned) host buffers.

GPU loads and saves never hold a CPU copy of the model: bytes travel through a small, fixed
ring of host buffers (``staging_buffers`` x ``staging_buffer_bytes``, see settings.py).

Load (file -> device)::

    reader threads: wait slot's event -> pread a fill into the slot (C++, GIL released,
    (two)           parallel on the I/O pool) -> hand the slot to the caller's thread
    caller thread:  issue the host->device copies of the fill on a side stream, record an
                    event on the slot, give the slot back to the reader

Save (device -> file) runs the same ring the other way: the caller's thread issues
device->host copies into free slots; a writer thread waits for each slot's event, checksums
the bytes if asked (crc32) and pwrites them at their planned file offsets (C++, GIL released),
then frees the slot.

Where threads and the GIL go: file I/O and event waits run with the GIL released (the C++
pool for pread/pwrite, torch's ``Event.synchronize`` for waits), so the reader/writer thread
overlaps with the copy issue, which needs torch and so Python, on the caller's thread. The
scheduling core (:func:`plan_fills`, :func:`stream_in`, :func:`stream_out`) knows nothing of
devices: it moves bytes between a file and a :class:`Copier`'s host slots. :class:`TorchCopier`
drives CUDA (pinned tensors, a side stream, events) or, on a CPU device, plain synchronous
copies; tests drive the scheduling with :class:`SimulatedCopier`, whose copies run late on a
thread of their own.

Per storage, the result is torch's: each storage gets its own device allocation, and the
caller's current stream waits for the side stream before tensors are handed out.
"""

from __future__ import annotations

import array
import ctypes
import dataclasses
import queue
import threading
import time
import zlib
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch

from . import _core
from .settings import get_options

__all__ = [
    "Copier",
    "DevicePayload",
    "Fill",
    "HostSlot",
    "SimulatedCopier",
    "TorchCopier",
    "copier_for",
    "payload_size",
    "plan_fills",
    "save_payloads",
    "stream_in",
    "stream_out",
    "stream_to_device",
    "write_payloads_at",
]

#: Offsets of pieces inside a host buffer are aligned to this (DMA- and vector-friendly).
HOST_ALIGNMENT = 64
#: A fill with at least this many pieces is copied in one host->device transfer into a device
#: scratch buffer, then scattered on the device with one batched kernel (torch._foreach_copy_).
BATCH_PIECES = 8


# ------------------------------------------------------------------------------ interfaces
class Event(Protocol):
    """Completion of the copies issued into or out of one host slot."""

    def query(self) -> bool: ...
    def synchronize(self) -> None: ...


@dataclasses.dataclass
class HostSlot:
    """One staging buffer: `nbytes` of host memory at `address`, owned by `owner`."""

    address: int
    nbytes: int
    owner: Any
    event: Event | None = None


class Copier(Protocol):
    """Moves bytes between host slots and destinations that the pipeline never looks into."""

    def allocate(self, nbytes: int) -> HostSlot:
        """A host buffer of `nbytes` (pinned for CUDA)."""
        ...

    def bind(self, target: Any) -> Any:
        """Prepares a destination (storage or tensor) once; the result goes into segments."""
        ...

    def to_device(self, slot: HostSlot, segments: Sequence[Segment]) -> Event:
        """Issues copies slot[host_offset:+n] -> target[target_offset:+n]."""
        ...

    def to_host(self, slot: HostSlot, segments: Sequence[Segment]) -> Event:
        """Issues copies target[target_offset:+n] -> slot[host_offset:+n]."""
        ...

    def finish(self) -> None:
        """Makes the caller's stream wait for every copy issued so far."""
        ...


#: (host_offset, nbytes, bound target, target_offset)
Segment = tuple[int, int, Any, int]


@dataclasses.dataclass
class Fill:
    """What one slot carries: file ranges (file_offset, nbytes, host_offset) and the
    segments to copy."""

    reads: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)
    segments: list[Segment] = dataclasses.field(default_factory=list)
    used: int = 0
    #: Optional, one per segment: what the segment's bytes belong to (CRC bookkeeping).
    keys: list[Any] | None = None


def plan_fills(
    requests: Iterable[tuple[int, int, Any]], buffer_bytes: int, *, sort: bool = True
) -> list[Fill]:
    """Packs (file_offset, nbytes, target) requests into buffer-sized fills.

    Requests are taken in file order (sequential reads), small ones share a fill, a request
    larger than what is left of a buffer continues in the next one. Every byte of every
    request lands in exactly one segment.
    """
    if buffer_bytes < HOST_ALIGNMENT:
        raise ValueError(f"buffer_bytes must be >= {HOST_ALIGNMENT}, got {buffer_bytes}")
    items = sorted(requests, key=lambda r: r[0]) if sort else list(requests)
    fills: list[Fill] = []
    fill = Fill()
    pos = 0
    for file_offset, nbytes, target in items:
        done = 0
        while done < nbytes:
            if pos >= buffer_bytes:
                fills.append(fill)
                fill, pos = Fill(), 0
            take = min(nbytes - done, buffer_bytes - pos)
            fill.reads.append((file_offset + done, take, pos))
            fill.segments.append((pos, take, target, done))
            fill.used = pos + take
            pos = _align_up(pos + take, HOST_ALIGNMENT)
            done += take
    if fill.segments:
        fills.append(fill)
    return fills


def _align_up(n: int, a: int) -> int:
    return (n + a - 1) & ~(a - 1)


# ---------------------------------------------------------------------------- the pipeline
class _Stop:
    """Sentinel that tells the helper thread to leave."""


_STOP = _Stop()


def _ring(copier: Copier, fills: Sequence[Fill], buffers: int) -> list[HostSlot]:
    size = max(f.used for f in fills)
    return [copier.allocate(size) for _ in range(min(buffers, len(fills)))]


def _settle(slots: Sequence[HostSlot]) -> None:
    """Waits for every copy still in flight on the slots (their memory may then go)."""
    for slot in slots:
        event, slot.event = slot.event, None
        if event is not None:
            try:
                event.synchronize()
            except Exception:  # noqa: BLE001 - the first error is already on its way
                pass


def stream_in(
    source: Any,
    fills: Sequence[Fill],
    copier: Copier,
    *,
    buffers: int,
    threads: int,
    chunk_bytes: int,
    readers: int = 2,
) -> None:
    """Runs the load pipeline: reader threads read fills from `source` (a _core.File or
    BufferSource) into free slots; this thread copies each filled slot out.

    Two readers by default: while one waits for the slowest piece of its fill, the other's
    reads keep the I/O pool busy (fills complete in any order; each lands where its segments
    say). Raises the first read or copy error; in every case the reader threads have ended
    and no copy is in flight on the ring when this returns.
    """
    if not fills:
        return
    slots = _ring(copier, fills, buffers)
    free: queue.SimpleQueue[Any] = queue.SimpleQueue()
    filled: queue.SimpleQueue[Any] = queue.SimpleQueue()
    for slot in slots:
        free.put(slot)
    stop = threading.Event()
    pending = iter(fills)
    take_lock = threading.Lock()

    def reader() -> None:
        try:
            while not stop.is_set():
                with take_lock:
                    fill = next(pending, None)
                if fill is None:
                    return
                slot = free.get()
                if slot is _STOP or stop.is_set():
                    return
                event, slot.event = slot.event, None
                if event is not None:
                    event.synchronize()  # the slot's last copies are done: reuse is safe
                requests = array.array("Q")
                for file_offset, nbytes, host_offset in fill.reads:
                    requests.extend((file_offset, nbytes, slot.address + host_offset))
                source.read_into(requests, threads, chunk_bytes)
                filled.put((fill, slot))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            filled.put(e)

    workers = [
        threading.Thread(target=reader, name=f"ckptio-stage-in-{i}", daemon=True)
        for i in range(max(1, min(readers, len(slots))))
    ]
    for t in workers:
        t.start()
    try:
        for _ in fills:
            item = filled.get()
            if isinstance(item, BaseException):
                raise item
            fill, slot = item
            slot.event = copier.to_device(slot, fill.segments)
            free.put(slot)
        copier.finish()
        for t in workers:
            t.join()
        # The last copies: their errors must surface here too, and the slots' memory may go
        # once they are done (at most one ring of copies: a few milliseconds on a GPU).
        for slot in slots:
            event, slot.event = slot.event, None
            if event is not None:
                event.synchronize()
    finally:
        stop.set()
        for _ in workers:
            free.put(_STOP)  # wakes a reader that waits for a slot
        for t in workers:
            t.join()
        _settle(slots)


def stream_out(
    file: _core.File,
    fills: Sequence[Fill],
    copier: Copier,
    *,
    buffers: int,
    threads: int,
    chunk_bytes: int,
    crc32: bool = False,
) -> dict[Any, int]:
    """Runs the save pipeline: copies every fill's segments out of the device into a free
    slot on this thread, writes the slot at the fill's file offsets on a writer thread.

    With `crc32`, returns the CRC-32 of each key's bytes (``Fill.keys``, one key per
    segment): pieces of one key reach the writer in file order, so their CRCs chain.
    """
    crcs: dict[Any, int] = {}
    if not fills:
        return crcs
    slots = _ring(copier, fills, buffers)
    free: queue.SimpleQueue[Any] = queue.SimpleQueue()
    filled: queue.SimpleQueue[Any] = queue.SimpleQueue()
    for slot in slots:
        free.put(slot)

    def writer() -> None:
        try:
            while True:
                item = filled.get()
                if item is _STOP:
                    return
                fill, slot = item
                event, slot.event = slot.event, None
                if event is not None:
                    event.synchronize()  # the bytes are in the slot
                requests = array.array("Q")
                for file_offset, nbytes, host_offset in fill.reads:
                    requests.extend((file_offset, nbytes, slot.address + host_offset))
                if crc32:
                    keys = fill.keys if fill.keys is not None else [None] * len(fill.segments)
                    for (host_offset, nbytes, _, _), key in zip(fill.segments, keys, strict=True):
                        view = _core.raw_memoryview(slot.address + host_offset, nbytes)
                        crcs[key] = _core.crc32(view, crcs.get(key, 0))
                file.write_from(requests, threads, chunk_bytes)
                free.put(slot)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            free.put(e)

    thread = threading.Thread(target=writer, name="ckptio-stage-out", daemon=True)
    thread.start()
    try:
        for fill in fills:
            slot = free.get()
            if isinstance(slot, BaseException):
                raise slot
            slot.event = copier.to_host(slot, fill.segments)
            filled.put((fill, slot))
        filled.put(_STOP)
        thread.join()
        # The writer may have failed on the last fills after the loop handed them over.
        while True:
            try:
                item = free.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, BaseException):
                raise item
    finally:
        filled.put(_STOP)
        thread.join()
        _settle(slots)
    return crcs


# -------------------------------------------------------------------------------- copiers
class _DoneEvent:
    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


_side_streams: dict[int, Any] = {}
_side_lock = threading.Lock()


def _side_stream(device: torch.device) -> Any:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _side_lock:
        stream = _side_streams.get(index)
        if stream is None:
            stream = _side_streams[index] = torch.cuda.Stream(device=index)
        return stream


def _flat_bytes(target: Any) -> torch.Tensor:
    """A flat uint8 tensor over a storage's or contiguous tensor's memory."""
    if (
        type(target) is torch.Tensor
        and target.dtype == torch.uint8
        and target.dim() == 1
        and target.is_contiguous()
    ):
        return target  # the common case (storages a load allocates): no new view
    if isinstance(target, torch.storage.TypedStorage):
        target = target._untyped_storage
    if isinstance(target, torch.UntypedStorage):
        t = torch.empty((0,), dtype=torch.uint8, device=target.device)
        return t.set_(target, 0, (target.nbytes(),), (1,))
    if isinstance(target, torch.Tensor):
        if not target.is_contiguous():
            raise ValueError("a staging destination tensor must be contiguous")
        flat = target.detach().reshape(-1)
        return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat
    raise TypeError(f"a staging target must be a storage or a tensor, got {type(target)!r}")


class TorchCopier:
    """Copies through torch: on CUDA, pinned slots and async copies on a side stream, one
    event per slot; on any other device, synchronous copies (used to test this code on CPU).

    Fills of many small pieces go host->device in one transfer into a device scratch buffer
    and are scattered by one ``torch._foreach_copy_`` (device->host: gathered the same way),
    so 20,000 small storages cost a few dozen transfers instead of 20,000.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.allocated = 0
        self._scratch: torch.Tensor | None = None
        self._stream: Any = None
        if self.cuda:
            self._stream = _side_stream(self.device)
            # Destinations were allocated (and sources written) on the caller's stream, whose
            # memory may still be in use by earlier kernels: order the side stream after it.
            self._stream.wait_stream(torch.cuda.current_stream(self.device))

    def allocate(self, nbytes: int) -> HostSlot:
        t = torch.empty((nbytes,), dtype=torch.uint8, pin_memory=self.cuda)
        self.allocated += 1
        return HostSlot(t.data_ptr(), nbytes, t)

    def bind(self, target: Any) -> torch.Tensor:
        flat = _flat_bytes(target)
        if flat.device.type != self.device.type:
            raise ValueError(f"a staging target on {flat.device} given to a {self.device} copier")
        return flat

    def _scratch_of(self, nbytes: int) -> torch.Tensor:
        if self._scratch is None or self._scratch.numel() < nbytes:
            self._scratch = torch.empty((nbytes,), dtype=torch.uint8, device=self.device)
        return self._scratch

    def _issue(self, fn: Callable[[], None]) -> Event:
        if not self.cuda:
            fn()
            return _DoneEvent()
        with torch.cuda.stream(self._stream):
            fn()
            event = torch.cuda.Event()
            event.record(self._stream)
        return event  # type: ignore[no-any-return]

    def to_device(self, slot: HostSlot, segments: Sequence[Segment]) -> Event:
        host: torch.Tensor = slot.owner

        def run() -> None:
            if len(segments) >= BATCH_PIECES:
                used = max(h + n for h, n, _, _ in segments)
                scratch = self._scratch_of(slot.nbytes)
                scratch[:used].copy_(host[:used], non_blocking=True)
                torch._foreach_copy_(
                    [t[o : o + n] for _, n, t, o in segments],
                    [scratch[h : h + n] for h, n, _, _ in segments],
                )
            else:
                for h, n, t, o in segments:
                    t[o : o + n].copy_(host[h : h + n], non_blocking=True)

        return self._issue(run)

    def to_host(self, slot: HostSlot, segments: Sequence[Segment]) -> Event:
        host: torch.Tensor = slot.owner

        def run() -> None:
            if len(segments) >= BATCH_PIECES:
                used = max(h + n for h, n, _, _ in segments)
                scratch = self._scratch_of(slot.nbytes)
                torch._foreach_copy_(
                    [scratch[h : h + n] for h, n, _, _ in segments],
                    [t[o : o + n] for _, n, t, o in segments],
                )
                host[:used].copy_(scratch[:used], non_blocking=True)
            else:
                for h, n, t, o in segments:
                    host[h : h + n].copy_(t[o : o + n], non_blocking=True)

        return self._issue(run)

    def finish(self) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)


class _SimEvent:
    def __init__(self) -> None:
        self._done = threading.Event()
        self.error: BaseException | None = None

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self) -> None:
        if not self._done.wait(timeout=60):
            raise TimeoutError("simulated copy never completed")
        if self.error is not None:
            raise self.error


class SimulatedCopier:
    """A stand-in "device" for CPU tests: targets are CPU storages or tensors, and every batch
    of copies runs late (after `delay` seconds) on a copy thread of its own, in issue order,
    like a CUDA stream. It records what the scheduling must guarantee:

    * ``allocated``: host slots ever allocated (the ring bound);
    * ``violations``: a slot's bytes changed between issue and execution of an upload (the
      pipeline reused a slot before its event), or a download's slot was read before its event
      (checked by the test through the file contents);
    * ``finished_after``: copies issued when ``finish`` was last called (all, if the pipeline
      waits before handing out results).

    ``fail_issue=k`` raises on the k-th issue (0-based); ``fail_copy=k`` makes the k-th batch
    fail when it runs (surfacing at ``synchronize``).
    """

    def __init__(
        self,
        delay: float = 0.0,
        *,
        fail_issue: int | None = None,
        fail_copy: int | None = None,
    ) -> None:
        self.delay = delay
        self.fail_issue = fail_issue
        self.fail_copy = fail_copy
        self.allocated = 0
        self.issued = 0
        self.violations: list[str] = []
        self.finished_after: int | None = None
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name="sim-copier", daemon=True)
        self._worker.start()

    def close(self) -> None:
        """Stops the copy thread (after the jobs already queued)."""
        self._jobs.put(None)
        self._worker.join(timeout=60)

    @property
    def alive(self) -> bool:
        return self._worker.is_alive()

    def allocate(self, nbytes: int) -> HostSlot:
        buf = _core.HostBuffer(nbytes, False)
        self.allocated += 1
        return HostSlot(buf.address, nbytes, buf)

    def bind(self, target: Any) -> tuple[int, int]:
        flat = _flat_bytes(target)
        if flat.device.type != "cpu":
            raise ValueError("SimulatedCopier targets live in CPU memory")
        return (flat.data_ptr(), flat.numel())

    def _submit(self, slot: HostSlot, segments: Sequence[Segment], upload: bool) -> Event:
        with self._lock:
            index = self.issued
            self.issued += 1
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        if index == self.fail_issue:
            with self._lock:
                self._in_flight -= 1
            raise RuntimeError(f"simulated copy issue failure at batch {index}")
        event = _SimEvent()
        digest = _slot_digest(slot, segments) if upload else None
        self._jobs.put((index, slot, list(segments), upload, digest, event))
        return event

    def to_device(self, slot: HostSlot, segments: Sequence[Segment]) -> Event:
        return self._submit(slot, segments, True)

    def to_host(self, slot: HostSlot, segments: Sequence[Segment]) -> Event:
        return self._submit(slot, segments, False)

    def finish(self) -> None:
        self.finished_after = self.issued

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            index, slot, segments, upload, digest, event = job
            try:
                if self.delay:
                    time.sleep(self.delay)
                if index == self.fail_copy:
                    raise RuntimeError(f"simulated copy failure at batch {index}")
                if upload and _slot_digest(slot, segments) != digest:
                    self.violations.append(f"slot reused before batch {index} ran")
                for h, n, (address, size), o in segments:
                    if o + n > size:
                        raise ValueError("simulated copy past the end of its target")
                    if upload:
                        ctypes.memmove(address + o, slot.address + h, n)
                    else:
                        ctypes.memmove(slot.address + h, address + o, n)
            except BaseException as e:  # noqa: BLE001 - reported through the event
                event.error = e
            with self._lock:
                self._in_flight -= 1
            event._done.set()


def _slot_digest(slot: HostSlot, segments: Sequence[Segment]) -> int:
    crc = 0
    for h, n, _, _ in segments:
        crc = zlib.crc32(_core.raw_memoryview(slot.address + h, n), crc)
    return crc


# ----------------------------------------------------------------------- device selection
def copier_for(device: torch.device) -> Copier | None:
    """The copier that stages storages for `device`, or None when the device is not staged
    (CPU, meta, other backends: they keep torch's own path). Tests replace this hook to run
    the staged paths on the CPU."""
    if device.type == "cuda":
        return TorchCopier(device)
    return None


def _resolved_cuda_device(target: str) -> torch.device | None:
    """The device torch's default_restore_location would restore to for a CUDA target, with
    torch's own checks (unavailable CUDA, bad index), or None when `target` is not CUDA."""
    if not (target == "cuda" or target.startswith("cuda:")):
        return None
    from torch.serialization import _validate_device

    result: Any = _validate_device(target, "cuda")
    # torch < 2.4 returned the index, later versions the device.
    return result if isinstance(result, torch.device) else torch.device("cuda", int(result))


class DeviceTarget:
    """Where staged storages of one load go: allocation on the device plus its copier."""

    def __init__(self, device: torch.device, make_copier: Callable[[], Copier]) -> None:
        self.device = device
        self.make_copier = make_copier

    def allocate(self, nbytes: int) -> torch.Tensor:
        """Fresh memory of its own (torch.load gives each storage its own allocation), as a
        flat uint8 tensor: the copier binds it as is, its untyped_storage() is the storage."""
        return torch.empty((nbytes,), dtype=torch.uint8, device=self.device)


def staging_target(target: str) -> DeviceTarget | None:
    """The DeviceTarget for a resolved restore location (e.g. "cuda:1"), or None when that
    location keeps torch's path. Tests replace this hook."""
    device = _resolved_cuda_device(target)
    if device is None:
        return None
    return DeviceTarget(device, lambda: TorchCopier(device))


def _knobs() -> tuple[int, int, int, int]:
    opts = get_options()
    buffer_bytes = opts.staging_buffer_bytes
    # Each fill is read by the whole pool: split it so every thread gets a piece.
    chunk = max(256 << 10, min(opts.chunk_bytes, buffer_bytes // opts.threads))
    return buffer_bytes, opts.staging_buffers, opts.threads, chunk


def load_into_storages(
    source: Any, requests: Sequence[tuple[int, int, Any]], copier: Copier
) -> None:
    """Fills device storages or tensors from `source`: (file_offset, nbytes, target) each."""
    buffer_bytes, buffers, threads, chunk = _knobs()
    bound = [(off, n, copier.bind(t)) for off, n, t in requests if n]
    fills = plan_fills(bound, buffer_bytes)
    stream_in(source, fills, copier, buffers=buffers, threads=threads, chunk_bytes=chunk)


def stream_to_device(
    source: Any,
    requests: Sequence[tuple[int, int, Any]],
    *,
    copier: Copier | None = None,
) -> None:
    """Reads file ranges straight into existing device memory through the staging ring.

    The hook for ``load_into``: each request is (file_offset, nbytes, destination), the
    destination a storage or a contiguous tensor (on a CUDA device, or wherever `copier`
    copies) with at least `nbytes` bytes; bytes land at its start. When this returns, the
    caller's current stream (of each device) is ordered after every copy.

    Args:
        source: a ``_core.File`` or ``_core.BufferSource``.
        requests: (file_offset, nbytes, destination) triples.
        copier: by default, the copier of each destination's device (one ring per device).

    Raises:
        ValueError: a request does not fit its destination, a destination tensor is not
            contiguous, or (without `copier`) a destination lives where nothing is staged
            (CPU memory: read into it directly instead).
    """
    if not requests:
        return
    by_device: dict[torch.device, list[tuple[int, int, Any]]] = {}
    for request in requests:
        _, nbytes, dest = request
        flat = _flat_bytes(dest)
        if nbytes < 0 or nbytes > flat.numel():
            raise ValueError(
                f"a request of {nbytes} bytes does not fit a destination of {flat.numel()}"
            )
        by_device.setdefault(flat.device, []).append(request)
    if copier is not None:
        load_into_storages(source, requests, copier)
        return
    copiers = {}
    for device in by_device:
        made = copier_for(device)
        if made is None:
            raise ValueError(f"stream_to_device: no staging copier for device {device}")
        copiers[device] = made
    for device, group in by_device.items():
        load_into_storages(source, group, copiers[device])


# ------------------------------------------------------------------------------- saving
@dataclasses.dataclass(frozen=True)
class DevicePayload:
    """A record payload that lives in device memory and streams out through the ring."""

    storage: torch.UntypedStorage
    copier: Copier

    @property
    def nbytes(self) -> int:
        return int(self.storage.nbytes())


def save_payloads(
    storages: Sequence[torch.UntypedStorage],
    copiers: dict[torch.device, Copier | None] | None = None,
) -> tuple[list[Any], list[Any]]:
    """The record payloads of storages being saved, and host copies that must stay alive
    meanwhile (the caller keeps `storages` alive too).

    CPU storages are written from their own memory ((address, nbytes) pairs); storages on a
    staged device (CUDA) become DevicePayloads, one copier per device, streamed through the
    ring; any other device is copied to the CPU whole, as before. `copiers`: the copier of
    each device the caller already asked :func:`copier_for` about (filled in as needed).
    """
    payloads: list[Any] = []
    keepalive: list[Any] = []  # host copies of storages of unstaged devices
    if copiers is None:
        copiers = {}
    cpu = torch.device("cpu")
    if cpu not in copiers:
        copiers[cpu] = copier_for(cpu)
    cpu_copier = copiers[cpu]  # None, unless a test stages CPU storages
    for storage in storages:
        device = storage.device
        if device.type == "cpu":  # the hot path: one test per storage
            if cpu_copier is None:
                payloads.append((storage.data_ptr(), storage.nbytes()))
                continue
            copier: Copier | None = cpu_copier
        else:
            if device not in copiers:
                copiers[device] = copier_for(device)
            copier = copiers[device]
        if copier is not None:
            payloads.append(DevicePayload(storage, copier))
            continue
        host = storage.cpu()
        keepalive.append(host)
        payloads.append((host.data_ptr(), host.nbytes()))
    return payloads, keepalive


def write_payloads_at(
    file: _core.File, placed: Sequence[tuple[Any, int, Any]], *, crc32: bool
) -> dict[Any, int]:
    """Writes each (key, file offset, payload) of `placed`: DevicePayloads stream through
    their copier's ring (one pass per copier), (address, nbytes) pairs go out in one parallel
    write. The payloads of records an archive writer reserved (ArchiveWriter.reserve) are
    written this way. With `crc32`, returns the CRC-32 of each key's payload."""
    opts = get_options()
    crcs: dict[Any, int] = {}
    by_copier: dict[int, tuple[Copier, list[tuple[int, int, Any]]]] = {}
    host = array.array("Q")
    for key, offset, p in placed:
        if isinstance(p, DevicePayload):
            if p.nbytes:
                entry = by_copier.setdefault(id(p.copier), (p.copier, []))
                entry[1].append((offset, p.nbytes, (key, entry[0].bind(p.storage))))
            elif crc32:
                crcs[key] = 0
            continue
        address, size = p
        if size:
            host.extend((offset, size, address))
        if crc32:
            crcs[key] = _core.crc32(_core.raw_memoryview(address, size)) if size else 0
    buffer_bytes, buffers, threads, chunk = _knobs()
    for copier, requests in by_copier.values():
        fills = plan_fills(requests, buffer_bytes)
        # Targets are (key, bound target): the copier sees the bound target, the key names
        # the CRC.
        for fill in fills:
            fill.keys = [t[0] for _, _, t, _ in fill.segments]
            fill.segments = [(h, m, t[1], o) for h, m, t, o in fill.segments]
        crcs.update(
            stream_out(
                file,
                fills,
                copier,
                buffers=buffers,
                threads=threads,
                chunk_bytes=chunk,
                crc32=crc32,
            )
        )
    if len(host):
        file.write_from(host, opts.threads, opts.write_chunk_bytes)
    return crcs


def payload_size(p: Any) -> int:
    """Bytes of an archive record's payload: a DevicePayload, an (address, nbytes) pair or a
    bytes-like object."""
    if isinstance(p, DevicePayload):
        return p.nbytes
    if isinstance(p, tuple):
        return int(p[1])
    return memoryview(p).nbytes
