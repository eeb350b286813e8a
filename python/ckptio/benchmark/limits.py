"""The machine's own limits, measured in the same run as the candidates.

Each limit moves the same number of bytes as a workload's file, with the simplest code that can
do it (ckptio's C++ parallel pread, Python threads of pwrite; no parsing at all):

* ``memcpy``: copy between two pre-faulted buffers (torch ``copy_``, multi-threaded).
* ``read prefaulted``: page cache -> memory that is already mapped (no page faults).
* ``read fresh 4K``: page cache -> freshly mapped memory advised ``MADV_NOHUGEPAGE``: every
  4 KiB page faults on first touch, as plain ``malloc``'d memory does.
* ``read fresh huge``: the same into fresh memory advised ``MADV_HUGEPAGE`` (2 MiB pages where
  the kernel grants them): the best "read into fresh memory" an eager loader can do.

  Both map the memory in pieces of 8 MiB, as a loader allocates per tensor: faulting in one
  mapping of the whole size was measured 25-45% slower on the development VM (2.93 GB:
  1.24-1.58 s against 0.97-1.10 s), which made the limit slower than the loads it bounds.
* ``map + touch``: map the file (private, read-only use) and read one byte of every page: what
  any mmap loader pays before its tensors' bytes are all reachable.
* ``write``: memory -> page cache, into a new file (a save without any encoding), from a
  populated read-only mapping of the source file. The synthetic workloads time it in their save
  rounds, among the writers (runner.py); it holds no buffer of its own there: the benchmark
  should not hold 1.4 GB the writers would not have, and with it held, ckptio's saves in a
  script that mimics the rounds were slower and noisier (bench/README.md, stop 10).
* ``cold read``: disk -> pre-faulted memory, N threads of ``pread`` (ckptio's thread count),
  after evicting the file's pages with ``posix_fadvise(POSIX_FADV_DONTNEED)`` (no privilege
  needed, and only this file is evicted); ``mincore`` must confirm the eviction, else the
  limit is reported as n/a.
* ``cold read O_DIRECT``: the same with the file opened ``O_DIRECT`` (no page cache at all),
  where the filesystem allows it.

The load rounds of one process time the warm limits again and again (:meth:`Limits.timers`);
the first loads time ``read fresh 4K`` and ``read fresh huge`` as the first thing a fresh
process does, and the cold loads time the cold limits, the file evicted before each sample
(:meth:`Limits.first`).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import mmap
import os
import threading
import time
from typing import Callable, Iterator, Optional

import torch

from .. import _core
from ..settings import get_options

__all__ = ["COLD_LIMITS", "FIRST_LIMITS", "LIMITS", "Limits", "evict", "resident_fraction"]

#: Timed in the repeated load rounds of one process.
LIMITS = ("memcpy", "read prefaulted", "read fresh 4K", "read fresh huge", "map + touch", "write")
#: Timed as a fresh process's first work, beside the first loads (page cache warm).
FIRST_LIMITS = ("read fresh 4K", "read fresh huge", "map + touch")
#: Timed as a fresh process's first work, beside the cold first loads (the file evicted).
COLD_LIMITS = ("cold read", "cold read O_DIRECT")
#: The fresh-memory limits map their memory in pieces of this size (module docstring).
FRESH_PIECE = 8 << 20


def _read_into(path: str, address: int, nbytes: int) -> None:
    opts = get_options()
    with _core.io.File.open(path, _core.io.FileMode.READ) as f:
        f.read_into(array.array("Q", (0, nbytes, address)), opts.threads, opts.chunk_bytes)


def resident_fraction(path: str) -> Optional[float]:
    """The fraction of `path`'s pages that are in the page cache (``mincore``), or None."""
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        with open(path, "rb") as fh:
            # A private mapping exports a writable buffer (ctypes needs one for an address);
            # it is never written, so no page is copied.
            m = mmap.mmap(fh.fileno(), size, flags=mmap.MAP_PRIVATE)
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            anchor = ctypes.c_char.from_buffer(m)
            rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec)
            del anchor
        finally:
            m.close()
    except (OSError, AttributeError, ValueError, TypeError):
        return None
    if rc != 0:
        return None
    return sum(b & 1 for b in vec) / pages


@contextlib.contextmanager
def _populated_mapping(path: str, nbytes: int) -> Iterator[memoryview]:
    """A read-only view of `path`'s first `nbytes` bytes, mapped with its page-cache pages
    already in place (``MAP_POPULATE``), so that reading it faults nothing."""
    if nbytes == 0:
        yield memoryview(b"")
        return
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    with open(path, "rb") as fh:
        m = mmap.mmap(fh.fileno(), nbytes, flags=flags, prot=mmap.PROT_READ)
    try:
        with memoryview(m) as view:
            yield view
    finally:
        m.close()


def evict(path: str) -> Optional[float]:
    """Drops `path`'s pages from the page cache; returns the fraction of its pages still
    resident afterwards (``mincore``: 0.0 when the eviction worked), or None when this system
    cannot evict or tell."""
    if not hasattr(os, "posix_fadvise"):
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return resident_fraction(path)


def evicted(resident: Optional[float]) -> bool:
    """Whether :func:`evict`'s result says the file really left the page cache."""
    return resident is not None and resident < 0.05


class Limits:
    """Callables that each time one limit for `nbytes` bytes (the size of `source`, a file in
    the page cache); `scratch` is a path this object may create and delete."""

    def __init__(self, source: str, scratch: str) -> None:
        self.source = source
        self.scratch = scratch
        self.nbytes = os.path.getsize(source)
        self._pair: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.cold_note: Optional[str] = None

    def _buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Two pre-faulted buffers of the file's size, allocated on first use (the load rounds)."""
        if self._pair is None:
            n = max(self.nbytes, 1)
            self._pair = (torch.ones(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8))
        return self._pair

    def close(self) -> None:
        try:
            os.unlink(self.scratch)
        except FileNotFoundError:
            pass
        self._pair = None

    def timers(self) -> dict[str, Callable[[], Optional[float]]]:
        return {
            "memcpy": self.memcpy,
            "read prefaulted": self.read_prefaulted,
            "read fresh 4K": self.read_fresh_4k,
            "read fresh huge": self.read_fresh_huge,
            "map + touch": self.map_touch,
            "write": self.write,
        }

    def first(self, name: str, cold: bool) -> tuple[Optional[float], Optional[float]]:
        """Times limit `name` once, as a fresh process's first work; `cold` evicts the source
        from the page cache first. Returns (seconds or None, the resident fraction after the
        eviction or None)."""
        if name == "cold read O_DIRECT":
            return self._cold_read_direct()
        if name == "cold read":
            return self._cold_read()
        if name not in FIRST_LIMITS:
            raise ValueError(f"unknown first-process limit {name!r}")
        resident = evict(self.source) if cold else None
        return self.timers()[name](), resident

    def memcpy(self) -> float:
        a, b = self._buffers()
        t0 = time.perf_counter()
        b.copy_(a)
        return time.perf_counter() - t0

    def read_prefaulted(self) -> float:
        b = self._buffers()[1]
        t0 = time.perf_counter()
        _read_into(self.source, b.data_ptr(), self.nbytes)
        return time.perf_counter() - t0

    def read_fresh_4k(self) -> float:
        return self._read_fresh(huge=False)

    def read_fresh_huge(self) -> float:
        return self._read_fresh(huge=True)

    def _read_fresh(self, huge: bool) -> float:
        """The file read into fresh memory mapped per :data:`FRESH_PIECE` (module docstring),
        advised for huge pages or against them, as one parallel read."""
        t0 = time.perf_counter()
        buffers: list[_core.io.HostBuffer] = []
        maps: list[mmap.mmap] = []
        anchors: list[ctypes.c_char] = []  # pin each mapping's address while it is read into
        requests = array.array("Q")
        for start in range(0, self.nbytes, FRESH_PIECE):
            size = min(FRESH_PIECE, self.nbytes - start)
            if huge:
                buffers.append(_core.io.HostBuffer(size, True))
                address = buffers[-1].address
            else:
                maps.append(mmap.mmap(-1, size))
                if hasattr(mmap, "MADV_NOHUGEPAGE"):
                    maps[-1].madvise(mmap.MADV_NOHUGEPAGE)
                anchors.append(ctypes.c_char.from_buffer(maps[-1]))
                address = ctypes.addressof(anchors[-1])
            requests.extend((start, size, address))
        opts = get_options()
        with _core.io.File.open(self.source, _core.io.FileMode.READ) as f:
            f.read_into(requests, opts.threads, opts.chunk_bytes)
        dt = time.perf_counter() - t0
        anchors.clear()
        for m in maps:
            m.close()
        return dt

    def map_touch(self) -> float:
        t0 = time.perf_counter()
        with open(self.source, "rb") as fh:
            m = mmap.mmap(fh.fileno(), max(self.nbytes, 1), flags=mmap.MAP_PRIVATE)
        with memoryview(m) as view:
            sum(view[:: mmap.PAGESIZE])
        dt = time.perf_counter() - t0
        m.close()
        return dt

    def write(self) -> float:
        try:
            os.unlink(self.scratch)
        except FileNotFoundError:
            pass
        with _populated_mapping(self.source, self.nbytes) as view:
            threads = max(1, get_options().threads)
            chunk = max(1 << 20, -(-self.nbytes // threads))
            t0 = time.perf_counter()
            fd = os.open(self.scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

            def part(start: int) -> None:
                mv = view[start : min(start + chunk, self.nbytes)]
                off = start
                while mv.nbytes:
                    n = os.pwrite(fd, mv, off)
                    mv, off = mv[n:], off + n

            starts = range(0, self.nbytes, chunk)
            workers = [threading.Thread(target=part, args=(s,)) for s in starts]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            os.close(fd)
            return time.perf_counter() - t0

    def _cold_read(self) -> tuple[Optional[float], Optional[float]]:
        b = self._buffers()[1]  # allocated and faulted in before the eviction
        resident = evict(self.source)
        if not evicted(resident):
            self.cold_note = "the page cache could not be dropped for the file (fadvise)"
            return None, resident
        t0 = time.perf_counter()
        _read_into(self.source, b.data_ptr(), self.nbytes)
        return time.perf_counter() - t0, resident

    def _cold_read_direct(self) -> tuple[Optional[float], Optional[float]]:
        """N threads of pread on an O_DIRECT descriptor into pre-faulted, page-aligned memory
        (O_DIRECT needs aligned offsets, lengths and addresses: 8 MiB pieces, the last one
        rounded up to a page; reading past the end of the file stops at it)."""
        o_direct = getattr(os, "O_DIRECT", 0)
        if not o_direct:
            self.cold_note = "this system has no O_DIRECT"
            return None, None
        size = -(-max(self.nbytes, 1) // mmap.PAGESIZE) * mmap.PAGESIZE
        buf = mmap.mmap(-1, size)
        buf.write(b"\1" * size)  # fault it in before timing
        resident = evict(self.source)
        try:
            fd = os.open(self.source, os.O_RDONLY | o_direct)
        except OSError as e:
            buf.close()
            self.cold_note = f"the filesystem refuses O_DIRECT ({e.strerror})"
            return None, resident
        piece = 8 << 20
        starts = list(range(0, size, piece))
        lock = threading.Lock()
        errors: list[OSError] = []

        def worker() -> None:
            with memoryview(buf) as view:
                while True:
                    with lock:
                        if not starts or errors:
                            return
                        start = starts.pop()
                    try:
                        os.preadv(fd, [view[start : min(start + piece, size)]], start)
                    except OSError as e:
                        errors.append(e)

        threads = [threading.Thread(target=worker) for _ in range(max(1, get_options().threads))]
        try:
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            dt = time.perf_counter() - t0
        finally:
            os.close(fd)
            buf.close()
        if errors:
            self.cold_note = f"O_DIRECT reads failed ({errors[0].strerror})"
            return None, resident
        return dt, resident
