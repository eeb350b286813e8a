"""The staging pipeline: file <-> device memory through a ring of (pinned) host buffers.

GPU loads and saves never hold a CPU copy of the model: bytes travel through a small, fixed
ring of host buffers (``staging_buffers`` x ``staging_buffer_bytes``, see settings.py).

Load (file -> device)::

    reader threads: wait slot's event -> pread a fill into the slot (C++, GIL released,
    (two)           parallel on the I/O pool) -> hand the slot to the caller's thread
    caller thread:  issue the host->device copies of the fill on a side stream, record the
                    slot's event, give the slot back to the reader

A flush of a single fill (one storage, as a load whose reads are not deferred flushes) runs
on the caller's thread alone: no reader thread is started for it.

The ring of a load (:class:`Ring`: the host slots, pinned for CUDA, each with its one
blocking event) is made once per load and device (:meth:`DeviceTarget.load`) and reused by
every flush of that load; it goes with the load's DeviceTarget.

Save (device -> file) runs the same ring the other way: the caller's thread issues
device->host copies into free slots; a writer thread waits for each slot's event, checksums
the bytes if asked (crc32) and pwrites them at their planned file offsets (C++, GIL released),
then frees the slot.

Where threads and the GIL go: file I/O and event waits run with the GIL released (the C++
pool for pread/pwrite, torch's ``Event.synchronize`` for waits; the events are blocking, so a
waiting thread sleeps instead of spinning on a core), so the reader/writer thread overlaps
with the copy issue, which needs torch and so Python, on the caller's thread. The scheduling
core (:func:`plan_fills`, :func:`stream_in`, :func:`stream_out`) knows nothing of devices: it
moves bytes between a file and a :class:`Copier`'s host slots. :class:`TorchCopier` drives
CUDA (pinned tensors, a side stream, events) or, on a CPU device, plain synchronous copies;
tests drive the scheduling with a simulated copier (tests/_simulated_copier.py) whose copies
run late on a thread of their own.

Errors: when anything fails after copies were issued (a read, a copy issue that raised part
way through its batch, a copy that failed when it ran), the pipeline waits for every copy
issued so far (:meth:`Copier.fence`, then each slot's event) before it raises, so neither a
destination nor a slot can go back to its allocator while a copy still reads or writes it.

Per storage, the result is torch's: each storage gets its own device allocation, and the
caller's current stream waits for the side stream before tensors are handed out.
"""

from __future__ import annotations

import array
import dataclasses
import queue
import threading
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch

from . import _core
from ._verify import checker_of
from .settings import get_options

__all__ = [
    "Copier",
    "Fill",
    "HostSlot",
    "Ring",
    "TorchCopier",
    "copier_for",
    "plan_fills",
    "stream_in",
    "stream_out",
    "stream_to_device",
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
    """One staging buffer: `nbytes` of host memory at `address`, owned by `owner`.

    `event`: the completion of the copies last issued on the slot, while the pipeline has not
    waited for it yet. `marker`: the copier's own reusable event for the slot (TorchCopier
    records the same CUDA event at each issue instead of creating one per batch)."""

    address: int
    nbytes: int
    owner: Any
    event: Event | None = None
    marker: Any = None


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

    def fence(self) -> None:
        """Blocks until every copy issued so far has run or failed, including the part of a
        batch whose issue raised after queueing some copies (the error path: destinations
        and slots may be freed after it). Raises only what the wait itself raises."""
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

#: A ring with a slot size bound (a load's) never allocates slots smaller than this (nor
#: than the bound): storages of a few KiB flushed one at a time then share slots that
#: never need to grow.
_MIN_SLOT_BYTES = 1 << 20


class Ring:
    """The host slots of the pipeline, allocated through `copier` and reused.

    Slots are made on first use; a slot too small for a call's fills is replaced by a bigger
    one (the need, or twice the old size, or ``_MIN_SLOT_BYTES``, whichever is largest, capped
    at `slot_bytes` unless the need is larger). Every :func:`stream_in` or :func:`stream_out`
    given the ring reuses its slots, so a load that flushes its storages one at a time
    allocates its pinned memory once, not once per storage. A ring serves one pipeline at a
    time; each call leaves no copy in flight on it, so its memory may go with the ring.

    ``allocations`` counts the slots ever allocated (replacements included).
    """

    def __init__(self, copier: Copier, slot_bytes: int | None = None) -> None:
        self.copier = copier
        self.slot_bytes = slot_bytes
        self.slots: list[HostSlot] = []
        self.allocations = 0
        self._lock = threading.Lock()

    def take(self, count: int, nbytes: int) -> list[HostSlot]:
        """`count` slots of at least `nbytes` bytes each (allocated or grown as needed)."""
        for i in range(count):
            old = self.slots[i] if i < len(self.slots) else None
            if old is not None and old.nbytes >= nbytes:
                continue
            size = nbytes
            if self.slot_bytes is not None:
                grown = max(2 * old.nbytes if old is not None else 0, _MIN_SLOT_BYTES)
                size = max(nbytes, min(self.slot_bytes, grown))
            slot = self.copier.allocate(size)
            self.allocations += 1
            if old is None:
                self.slots.append(slot)
            else:
                _settle([old])  # nothing is in flight between calls; made sure of here
                self.slots[i] = slot
        return self.slots[:count]

    def __enter__(self) -> Ring:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("a staging ring serves one pipeline at a time")
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def _settle(slots: Sequence[HostSlot]) -> None:
    """Waits for every copy still in flight on the slots (their memory may then go)."""
    for slot in slots:
        event, slot.event = slot.event, None
        if event is not None:
            try:
                event.synchronize()
            except Exception:  # noqa: BLE001 - the first error is already on its way
                pass


def _fence(copier: Copier) -> None:
    """The error path: waits for every copy issued so far, those no slot's event covers
    included (a batch whose issue raised part way through)."""
    try:
        copier.fence()
    except Exception:  # noqa: BLE001 - the first error is already on its way
        pass


def _ring_for(copier: Copier, ring: Ring | None) -> Ring:
    if ring is None:
        return Ring(copier)
    if ring.copier is not copier:
        raise ValueError("the ring given was made by another copier")
    return ring


def stream_in(
    source: Any,
    fills: Sequence[Fill],
    copier: Copier,
    *,
    buffers: int,
    threads: int,
    chunk_bytes: int,
    readers: int = 2,
    ring: Ring | None = None,
) -> None:
    """Runs the load pipeline: reader threads read fills from `source` (a _core.io.File or
    BufferSource) into free slots; this thread copies each filled slot out.

    Two readers by default: while one waits for the slowest piece of its fill, the other's
    reads keep the I/O pool busy (fills complete in any order; each lands where its segments
    say). A single fill is read and copied on this thread, with no reader thread. The slots
    come from `ring` (made by `copier`; a ring of their own when None). Raises the first read
    or copy error; in every case the reader threads have ended and no copy is in flight when
    this returns.
    """
    if not fills:
        return
    with _ring_for(copier, ring) as own:
        slots = own.take(min(buffers, len(fills)), max(f.used for f in fills))
        if len(fills) == 1:
            _stream_in_here(source, fills[0], copier, slots[0], threads, chunk_bytes)
        else:
            _stream_in_threads(source, fills, copier, slots, threads, chunk_bytes, readers)


def _read_fill(source: Any, fill: Fill, slot: HostSlot, threads: int, chunk_bytes: int) -> None:
    requests = array.array("Q")
    for file_offset, nbytes, host_offset in fill.reads:
        requests.extend((file_offset, nbytes, slot.address + host_offset))
    checker = checker_of(source)
    if checker is None:
        source.read_into(requests, threads, chunk_bytes)
    else:
        # verify: the CRC-32 of each piece, computed on the pinned slot as it is read, before
        # the copy to the device; a record's pieces are combined when the batch settles.
        checker.check_reads(requests, source.read_into(requests, threads, chunk_bytes, 0, True))


def _stream_in_here(
    source: Any, fill: Fill, copier: Copier, slot: HostSlot, threads: int, chunk_bytes: int
) -> None:
    try:
        _read_fill(source, fill, slot, threads, chunk_bytes)
        slot.event = copier.to_device(slot, fill.segments)
        copier.finish()
        event, slot.event = slot.event, None
        event.synchronize()
    except BaseException:
        _fence(copier)
        raise
    finally:
        _settle([slot])


def _stream_in_threads(
    source: Any,
    fills: Sequence[Fill],
    copier: Copier,
    slots: list[HostSlot],
    threads: int,
    chunk_bytes: int,
    readers: int,
) -> None:
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
                _read_fill(source, fill, slot, threads, chunk_bytes)
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
    except BaseException:
        # Copies were queued that no slot's event may cover (a batch whose issue raised part
        # way through): wait for all of them before the destinations can be freed.
        _fence(copier)
        raise
    finally:
        stop.set()
        for _ in workers:
            free.put(_STOP)  # wakes a reader that waits for a slot
        for t in workers:
            t.join()
        _settle(slots)


def stream_out(
    file: _core.io.File,
    fills: Sequence[Fill],
    copier: Copier,
    *,
    buffers: int,
    threads: int,
    chunk_bytes: int,
    crc32: bool = False,
    ring: Ring | None = None,
) -> dict[Any, int]:
    """Runs the save pipeline: copies every fill's segments out of the device into a free
    slot on this thread, writes the slot at the fill's file offsets on a writer thread.

    With `crc32`, returns the CRC-32 of each key's bytes (``Fill.keys``, one key per
    segment): pieces of one key reach the writer in file order, so their CRCs chain. The
    slots come from `ring` (made by `copier`; a ring of their own when None).
    """
    crcs: dict[Any, int] = {}
    if not fills:
        return crcs
    with _ring_for(copier, ring) as own:
        slots = own.take(min(buffers, len(fills)), max(f.used for f in fills))
        _stream_out(file, fills, copier, slots, threads, chunk_bytes, crc32, crcs)
    return crcs


def _stream_out(
    file: _core.io.File,
    fills: Sequence[Fill],
    copier: Copier,
    slots: list[HostSlot],
    threads: int,
    chunk_bytes: int,
    crc32: bool,
    crcs: dict[Any, int],
) -> None:
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
                        view = _core.io.raw_memoryview(slot.address + host_offset, nbytes)
                        crcs[key] = _core.zip.crc32(view, crcs.get(key, 0))
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
    except BaseException:
        _fence(copier)  # as in stream_in: no copy may still read a source or write a slot
        raise
    finally:
        filled.put(_STOP)
        thread.join()
        _settle(slots)


# -------------------------------------------------------------------------------- copiers
class _DoneEvent:
    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


def completion_event() -> Any:
    """A CUDA event whose ``synchronize()`` blocks the waiting thread in the driver
    (``cudaEventBlockingSync``) instead of spinning on a core: the reader and writer threads of
    the ring, and async_save's caller, wait on these."""
    return torch.cuda.Event(blocking=True)


def _check_device(found: torch.device, expected: torch.device) -> None:
    """Raises ValueError unless memory on `found` is where a copier for `expected` copies:
    the same device type and, when `expected` names one, the same index (a CUDA copier's
    always does)."""
    if found.type != expected.type or (
        expected.index is not None and found.index != expected.index
    ):
        raise ValueError(
            f"a staging destination on {found} was given to the copier of {expected}: each "
            f"copier copies into its own device's memory only"
        )


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
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # bind checks the index
        self.device = device
        self.cuda = device.type == "cuda"
        self.allocated = 0
        self._scratch: torch.Tensor | None = None
        self._stream: Any = None
        self._ordered = False  # the side stream waits for the caller's since the last finish
        if self.cuda:
            self._stream = _side_stream(self.device)

    def allocate(self, nbytes: int) -> HostSlot:
        t = torch.empty((nbytes,), dtype=torch.uint8, pin_memory=self.cuda)
        self.allocated += 1
        return HostSlot(t.data_ptr(), nbytes, t)

    def bind(self, target: Any) -> torch.Tensor:
        flat = _flat_bytes(target)
        _check_device(flat.device, self.device)
        return flat

    def _scratch_of(self, nbytes: int) -> torch.Tensor:
        if self._scratch is None or self._scratch.numel() < nbytes:
            self._scratch = torch.empty((nbytes,), dtype=torch.uint8, device=self.device)
        return self._scratch

    def _issue(self, slot: HostSlot, fn: Callable[[], None]) -> Event:
        if not self.cuda:
            fn()
            return _DoneEvent()
        if not self._ordered:
            # Destinations were allocated (and sources written) on the caller's stream, whose
            # memory may still be in use by kernels queued there: order the side stream after
            # it, at each pipeline run (a load's copier serves all its flushes, and kernels
            # may be queued between them).
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            self._ordered = True
        with torch.cuda.stream(self._stream):
            fn()  # raising part way through: the pipeline fences (see fence)
        # One event per slot, recorded again at each issue: the pipeline waits for a slot's
        # event before it issues on the slot again, so no wait can see a later record.
        event = slot.marker
        if event is None:
            event = slot.marker = completion_event()
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

        return self._issue(slot, run)

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

        return self._issue(slot, run)

    def finish(self) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
            self._ordered = False

    def fence(self) -> None:
        if self.cuda:  # everything queued on the side stream so far, partial batches too
            done = completion_event()
            done.record(self._stream)
            done.synchronize()


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
    """Where staged storages of one load go: allocation on the device, and the load's ring.

    The ring (pinned slots, each with its event) is made with the copier `make_copier`
    returns on the first :meth:`load` and reused by every later one: a load whose reads are
    not deferred flushes each storage on its own, and they all share it. It is released with
    the target, that is with the load (or by :meth:`close`)."""

    def __init__(self, device: torch.device, make_copier: Callable[[], Copier]) -> None:
        self.device = device
        self.make_copier = make_copier
        self.ring: Ring | None = None

    def load(self, source: Any, requests: Sequence[tuple[int, int, Any]]) -> None:
        """Fills device storages from `source`, (file_offset, nbytes, target) each, through
        this target's ring."""
        if self.ring is None:
            copier = self.make_copier()
            self.ring = Ring(copier, slot_bytes=get_options().staging_buffer_bytes)
        load_into_storages(source, requests, self.ring.copier, ring=self.ring)

    def close(self) -> None:
        """Releases the ring (no copy is in flight on it between loads)."""
        self.ring = None

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


def ring_knobs() -> tuple[int, int, int, int]:
    """(buffer bytes, buffers, threads, chunk bytes) of the staging ring, from the caller's
    options; loads and saves alike."""
    opts = get_options()
    buffer_bytes = opts.staging_buffer_bytes
    # Each fill is read or written by the whole pool: split it so every thread gets a piece.
    chunk = max(256 << 10, min(opts.chunk_bytes, buffer_bytes // opts.threads))
    return buffer_bytes, opts.staging_buffers, opts.threads, chunk


def load_into_storages(
    source: Any,
    requests: Sequence[tuple[int, int, Any]],
    copier: Copier,
    *,
    ring: Ring | None = None,
) -> None:
    """Fills device storages or tensors from `source`: (file_offset, nbytes, target) each,
    through `ring` (made by `copier`) or a ring of this call's own."""
    buffer_bytes, buffers, threads, chunk = ring_knobs()
    bound = [(off, n, copier.bind(t)) for off, n, t in requests if n]
    fills = plan_fills(bound, buffer_bytes)
    stream_in(source, fills, copier, buffers=buffers, threads=threads, chunk_bytes=chunk, ring=ring)


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
        source: a ``_core.io.File`` or ``_core.io.BufferSource``.
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
