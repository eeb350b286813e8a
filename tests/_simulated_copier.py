"""SimulatedCopier: a stand-in "device" for the staging pipeline, for tests on the CPU.

Test-only code: tests/test_staging.py drives the scheduling core of ckptio._staging through it,
and tests/gpu/bench_gpu.py --cpu-smoke runs the benchmark's steps with it. Its copies run late
on a thread of their own, in issue order, like a CUDA stream, so a pipeline that reuses a slot
or frees a destination before its copies ran is caught.
"""

from __future__ import annotations

import ctypes
import queue
import threading
import time
import zlib
from typing import Any, Sequence

import torch

from ckptio import _core
from ckptio._staging import Event, HostSlot, Segment, _check_device, _flat_bytes

__all__ = ["SimulatedCopier"]


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
    """Targets are CPU storages or tensors, and every batch of copies runs late (after `delay`
    seconds) on a copy thread of its own, in issue order. It records what the scheduling must
    guarantee:

    * ``allocated``: host slots ever allocated (the ring bound);
    * ``violations``: a slot's bytes changed between issue and execution of an upload (the
      pipeline reused a slot before its event), or a download's slot was read before its event
      (checked by the test through the file contents);
    * ``finished_after``: copies issued when ``finish`` was last called (all, if the pipeline
      waits before handing out results);
    * ``queued`` / ``completed``: batches handed to the copy thread, and batches it ran (or
      failed): equal when nothing is left in flight.

    ``fail_issue=k`` raises on the k-th issue (0-based) before queueing anything;
    ``fail_after_queue=k`` queues the k-th batch, then raises (a failure after some copies were
    queued: they still run, late, into their destinations); ``fail_copy=k`` makes the k-th
    batch fail when it runs (surfacing at ``synchronize``). ``device``: where destinations
    must live (CPU memory; ``bind`` checks it as TorchCopier.bind does).
    """

    def __init__(
        self,
        delay: float = 0.0,
        *,
        fail_issue: int | None = None,
        fail_after_queue: int | None = None,
        fail_copy: int | None = None,
        device: Any = "cpu",
    ) -> None:
        self.delay = delay
        self.fail_issue = fail_issue
        self.fail_after_queue = fail_after_queue
        self.fail_copy = fail_copy
        self.device = torch.device(device)
        self.allocated = 0
        self.issued = 0
        self.queued = 0
        self.completed = 0
        self.fences = 0
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

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def allocate(self, nbytes: int) -> HostSlot:
        buf = _core.io.HostBuffer(nbytes, False)
        self.allocated += 1
        return HostSlot(buf.address, nbytes, buf)

    def bind(self, target: Any) -> tuple[int, int]:
        flat = _flat_bytes(target)
        _check_device(flat.device, self.device)  # the check TorchCopier.bind makes
        return (flat.data_ptr(), flat.numel())

    def _submit(self, slot: HostSlot, segments: Sequence[Segment], upload: bool) -> Event:
        with self._lock:
            index = self.issued
            self.issued += 1
        if index == self.fail_issue:
            raise RuntimeError(f"simulated copy issue failure at batch {index}")
        event = _SimEvent()
        digest = _slot_digest(slot, segments) if upload else None
        with self._lock:
            self._in_flight += 1
            self.queued += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        self._jobs.put((index, slot, list(segments), upload, digest, event))
        if index == self.fail_after_queue:
            raise RuntimeError(f"simulated copy issue failure at batch {index} after queueing")
        return event

    def to_device(self, slot: HostSlot, segments: Sequence[Segment]) -> Event:
        return self._submit(slot, segments, True)

    def to_host(self, slot: HostSlot, segments: Sequence[Segment]) -> Event:
        return self._submit(slot, segments, False)

    def finish(self) -> None:
        self.finished_after = self.issued

    def fence(self) -> None:
        """Waits until every batch queued so far has run (like synchronizing the stream)."""
        self.fences += 1
        done = threading.Event()
        self._jobs.put(done)
        done.wait(timeout=60)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if isinstance(job, threading.Event):  # a fence: every earlier job has run
                job.set()
                continue
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
                self.completed += 1
            event._done.set()


def _slot_digest(slot: HostSlot, segments: Sequence[Segment]) -> int:
    crc = 0
    for h, n, _, _ in segments:
        crc = zlib.crc32(_core.io.raw_memoryview(slot.address + h, n), crc)
    return crc
