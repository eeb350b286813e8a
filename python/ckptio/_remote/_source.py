"""A remote object as a source of the read engine: concurrent ranged GETs written straight
into the destinations' memory.

A :class:`RemoteSource` has what every source has (``name``, ``size``, ``pread``,
``read_into``), so :class:`ckptio._reads.ReadBatch`, the storage loader, ``open``'s handles,
``load_into`` and the staging ring read it as they read a local file:

* **Opening** costs one round trip: two GETs at once, the object's first ``probe_bytes``
  (a safetensors header, torch.save's ``data.pkl``) and its last ones (a zip's end record and
  central directory, ckptio's ``data.pkl``). Their ``Content-Range`` gives the size, their
  ``ETag`` the version every later request asks for (``If-Match``).
* **The zip container** is parsed by the same C++ reader as a local file's
  (``_core.zip.read_zip_directory``), which takes a ``_core.io.File`` or ``BufferSource``, not
  a Python object. :meth:`RemoteSource.zip_directory_source` gives it a ``BufferSource`` over
  an anonymous mapping the size of the object (``MAP_NORESERVE``: pages never written take no
  memory) holding the bytes it will read: the tail, the rest of the central directory if the
  tail missed some, each record's local header and the metadata records, fetched in one more
  round of concurrent GETs (:mod:`._zip` says where they lie). A byte the reader needs that
  was not fetched reads as zero and fails its checks: a CheckpointError, never a wrong
  offset. This keeps one validator for local and remote archives, with no C++ change; the
  mapping is dropped once the directory is parsed, and what was fetched stays in a small
  cache of regions that serves ``pread`` (data.pkl, version) and reads inside it.
  With :attr:`RemoteSource.predict_headers` (an eager ``load`` sets it), the storages' local
  headers are not fetched in that round when the archive is laid out as torch's (and
  ckptio's) writer lays one out (:func:`._zip.predict_storage_headers`): the reader gets the
  predicted ones, each payload's GET also fetches the real header before it (contiguous,
  so the same GET), and :meth:`RemoteSource.check_predictions` compares every one before the
  load returns; a mismatch raises :class:`Mispredicted` and the caller loads again with the
  headers fetched (never a tensor read from a wrong offset).
* **Data reads** (:meth:`RemoteSource.read_into`): the (offset, length, address) requests are
  sorted, cut into pieces of at most ``chunk_bytes`` (the setting local reads use) and
  neighbours less than ``COALESCE_GAP`` apart merged into one GET; each GET's body is read
  from the socket into the destinations (``_core.io.raw_memoryview``), the gaps into a small
  scratch buffer. GETs run on a pool of ``remote_inflight_bytes // chunk_bytes`` threads
  with at most ``remote_inflight_bytes`` requested at once (settings).
* **Faults**: a reset, a timeout, a 5xx or 429, a body cut short or of the wrong length is
  retried with exponential backoff (``retries`` attempts in all, ``retry_backoff`` seconds
  first, storage_options); then an OSError (EIO) names the URL, the byte range and the last
  cause. 404 is FileNotFoundError, 401/403 PermissionError, an object whose ETag changed
  (412 to If-Match, or a different ETag) OSError ESTALE, a server that answers a ranged GET
  with 200 and the whole object OSError EIO at once (read the file locally). Nothing is
  returned before every byte asked for has arrived.
"""

from __future__ import annotations

import bisect
import concurrent.futures as cf
import errno
import mmap
import random
import threading
import time
from typing import Any, Callable, Sequence, TypeVar

from .. import _core
from .._archive import Mispredicted
from ..errors import CheckpointError
from ..settings import get_options
from . import _zip
from ._transport import (
    Changed,
    Forbidden,
    NotFound,
    RangeNotSatisfiable,
    Reply,
    Transient,
    Transport,
    Unexpected,
)

__all__ = ["COALESCE_GAP", "RemoteSource", "plan_gets"]

#: Requests less than this apart are read by one GET (the gap read and dropped): a GET costs
#: a round trip, worth far more than 64 KiB on any network.
COALESCE_GAP = 64 << 10
#: Header regions of the zip reader closer than this are fetched together (the payload
#: bytes between them stay in the cache, and the loads that read them next copy them from
#: there): the small records of a checkpoint, lying side by side, come in one GET with their
#: headers. The gap grows until at most MAX_HEADER_GETS GETs remain.
HEADER_GAP = 1 << 20
MAX_HEADER_GETS = 512
#: Reads of at most this many bytes that miss the cache (pread) are kept in it.
CACHE_PREAD_BYTES = 16 << 20

T = TypeVar("T")


class _Job:
    """One GET: bytes [start, stop) of the object, read into `pieces` (offset, address,
    length), sorted, non-overlapping, inside [start, stop)."""

    __slots__ = ("pieces", "start", "stop")

    def __init__(self, start: int, stop: int, pieces: list[tuple[int, int, int]]) -> None:
        self.start, self.stop, self.pieces = start, stop, pieces


def plan_gets(
    requests: Sequence[tuple[int, int, int]], chunk_bytes: int, gap: int = COALESCE_GAP
) -> list[_Job]:
    """The GETs that read `requests` ((offset, length, address) each): requests at most
    `gap` apart form one run (an overlapping request starts a run of its own), and each run
    is cut into the fewest GETs of at most `chunk_bytes`, of equal size, wherever the cuts
    fall (a request cut in two goes to two GETs)."""
    runs: list[_Job] = []
    for offset, length, address in sorted(requests):
        if not length:
            continue
        run = runs[-1] if runs else None
        if run is not None and run.stop <= offset <= run.stop + gap:
            run.pieces.append((offset, address, length))
            run.stop = offset + length
        else:
            runs.append(_Job(offset, offset + length, [(offset, address, length)]))
    jobs: list[_Job] = []
    for run in runs:
        count = -(-(run.stop - run.start) // chunk_bytes)
        if count == 1:
            jobs.append(run)
            continue
        step = -(-(run.stop - run.start) // count)
        cuts = [run.start + i * step for i in range(1, count)] + [run.stop]
        pieces: list[tuple[int, int, int]] = []
        i = 0
        for offset, address, length in run.pieces:
            while length:
                n = min(length, cuts[i] - offset)
                if n > 0:
                    pieces.append((offset, address, n))
                    offset, address, length = offset + n, address + n, length - n
                if offset >= cuts[i]:
                    if pieces:
                        jobs.append(_Job(pieces[0][0], pieces[-1][0] + pieces[-1][2], pieces))
                    pieces = []
                    i += 1
        if pieces:
            jobs.append(_Job(pieces[0][0], pieces[-1][0] + pieces[-1][2], pieces))
    return jobs


class _Regions:
    """Bytes of the object already fetched: sorted, non-overlapping (start, bytes) regions."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._data: list[bytes] = []
        self._lock = threading.Lock()

    def add(self, start: int, data: bytes) -> None:
        if not data:
            return
        with self._lock:
            stop = start + len(data)
            i = bisect.bisect_left(self._starts, start)
            if i > 0 and self._starts[i - 1] + len(self._data[i - 1]) >= start:
                i -= 1
            j = i
            while j < len(self._starts) and self._starts[j] <= stop:
                j += 1
            if i == j:
                self._starts.insert(i, start)
                self._data.insert(i, bytes(data))
                return
            lo = min(start, self._starts[i])
            hi = max(stop, self._starts[j - 1] + len(self._data[j - 1]))
            merged = bytearray(hi - lo)
            for s, d in zip(self._starts[i:j], self._data[i:j], strict=True):
                merged[s - lo : s - lo + len(d)] = d
            merged[start - lo : stop - lo] = data
            self._starts[i:j] = [lo]
            self._data[i:j] = [bytes(merged)]

    def find(self, offset: int, length: int) -> memoryview | None:
        """The cached bytes [offset, offset + length), or None unless all are cached."""
        with self._lock:
            i = bisect.bisect_right(self._starts, offset) - 1
            if i < 0:
                return None
            start, data = self._starts[i], self._data[i]
            if offset + length > start + len(data):
                return None
            return memoryview(data)[offset - start : offset - start + length]

    def items(self) -> list[tuple[int, bytes]]:
        with self._lock:
            return list(zip(self._starts, self._data, strict=True))

    def missing(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The (start, stop) of `ranges` not wholly cached."""
        return [(a, b) for a, b in ranges if self.find(a, b - a) is None]


def connections() -> int:
    """The GETs one source keeps in flight (``remote_inflight_bytes // chunk_bytes``, 2 to
    64): its thread count, and the connection pool size of every request maker of the same
    options, so that they share one cached S3 client."""
    opts = get_options()
    return max(2, min(64, opts.remote_inflight_bytes // opts.chunk_bytes))


class RemoteSource:
    """An object in S3 or on an HTTP server, read by ranges (see the module docstring).

    Args:
        transport: the protocol (``_s3.S3Transport``, ``_http.HTTPTransport``).
        attempts: tries per request before giving up (transient faults only).
        backoff: seconds before the first retry, doubled after each (with jitter).
        probe_bytes: bytes fetched from each end of the object when it is opened.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        attempts: int = 5,
        backoff: float = 0.2,
        probe_bytes: int = 1 << 20,
    ) -> None:
        self.name: str = transport.url
        self.url: str = transport.url
        self._transport = transport
        self._attempts = max(1, attempts)
        self._backoff = backoff
        opts = get_options()
        self._inflight_limit: int = opts.remote_inflight_bytes
        self._pool = cf.ThreadPoolExecutor(connections(), thread_name_prefix="ckptio-remote")
        self._budget = threading.Condition()
        self._inflight = 0
        self._regions = _Regions()
        #: predict the storages' local headers (module docstring) in zip_directory_source
        self.predict_headers = False
        #: the predictions not yet checked, by the payload's offset
        self._predicted: dict[int, _zip.Prediction] = {}
        self._mispredicted: str | None = None
        self._etag: str | None = None
        self._size = -1
        self._closed = False
        try:
            self._probe(probe_bytes)
        except BaseException:
            self.close()
            raise

    # -- the source protocol ------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    @property
    def etag(self) -> str | None:
        """The object's ETag when it was opened (every later GET asks for it)."""
        return self._etag

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def signed_get(self) -> dict[str, Any] | None:
        """Where the transport sends its signed GETs, for a cache to validate by without a
        client (``_s3.S3Transport.signed_get``); None for other transports."""
        return getattr(self._transport, "signed_get", None)

    def pread(self, offset: int, n: int) -> bytes:
        """Exactly `n` bytes at `offset` (CheckpointError past the end, as a file's pread)."""
        self._check_range(offset, n)
        cached = self._regions.find(offset, n)
        if cached is not None:
            return bytes(cached)
        out = bytearray(n)
        if n:
            address = _address_of(out)
            self._run(plan_gets([(offset, n, address)], get_options().chunk_bytes))
        if n <= CACHE_PREAD_BYTES:
            self._regions.add(offset, bytes(out))
        return bytes(out)

    def read_into(
        self,
        requests: Any,
        threads: int,
        chunk_bytes: int,
        base: int = 0,
        crc32: bool = False,
    ) -> list[int] | None:
        """Reads flat uint64 (offset, length, address) triples, each address relative to
        `base`, into memory the caller keeps alive; returns each request's CRC-32 with
        `crc32`. Every range is checked against the size before anything is read. `threads`
        (a CPU count) does not bound the GETs: they mostly wait on the network, so their
        concurrency is ``remote_inflight_bytes // chunk_bytes``."""
        del threads
        flat = memoryview(requests).cast("B").cast("Q")
        if len(flat) % 3:
            raise ValueError("read_into: requests must hold (offset, length, address) triples")
        triples = [(flat[i], flat[i + 1], flat[i + 2] + base) for i in range(0, len(flat), 3)]
        for offset, length, _ in triples:
            self._check_range(offset, length)
        remote = []
        for offset, length, address in triples:
            if not length:
                continue
            cached = self._regions.find(offset, length)
            if cached is not None:
                _core.io.raw_memoryview(address, length, readonly=False)[:] = cached
            else:
                remote.append((offset, length, address))
        if self._predicted:
            self._check_predictions_in(triples, remote, chunk_bytes)
        elif remote:
            self._run(plan_gets(remote, chunk_bytes))
        if not crc32:
            return None
        return [
            _core.zip.crc32(_core.io.raw_memoryview(address, length)) if length else 0
            for _, length, address in triples
        ]

    def _check_predictions_in(
        self,
        triples: list[tuple[int, int, int]],
        remote: list[tuple[int, int, int]],
        chunk_bytes: int,
    ) -> None:
        """Reads `remote` (the triples not served from the cache) with, for each predicted
        header just before a payload read from its start, that header too (the same GET:
        the gap between them is the padding), then checks every prediction whose header the
        reads covered, from the bytes read."""
        headers: list[tuple[_zip.Prediction, bytearray]] = []
        extra = []
        for offset, length, _ in remote:
            p = self._predicted.get(offset)
            if p is not None and length:
                buf = bytearray(len(p.header))
                headers.append((p, buf))
                extra.append((p.header_offset, len(buf), _address_of(buf)))
        if remote:
            self._run(plan_gets(remote + extra, chunk_bytes))
        for p, buf in headers:
            self._settle(p, buf)
        if not self._predicted:
            return
        # Headers inside a range read (small records read as one span): from that memory.
        spans = sorted((o, o + n, a) for o, n, a in triples if n)
        starts = [o for o, _, _ in spans]
        for p in list(self._predicted.values()):
            i = bisect.bisect_right(starts, p.header_offset) - 1
            if i >= 0:
                start, stop, address = spans[i]
                if p.header_offset + len(p.header) <= stop:
                    real = _core.io.raw_memoryview(address + p.header_offset - start, len(p.header))
                    self._settle(p, bytes(real))

    def _settle(self, p: _zip.Prediction, real: bytes | bytearray) -> None:
        """Marks prediction `p` checked against `real`, its header's bytes."""
        if self._predicted.pop(p.data_offset, None) is not None and not p.matches(real):
            self._mispredicted = self._mispredicted or (
                f"the local header at offset {p.header_offset} is not the predicted one"
            )

    @property
    def predicting(self) -> bool:
        """Whether predicted local headers are waiting to be checked (predict_headers)."""
        return bool(self._predicted)

    def check_predictions(self) -> None:
        """Checks every predicted local header not checked yet (fetching the missing ones in
        one round): raises :class:`Mispredicted` if any prediction was wrong."""
        pending = list(self._predicted.values())
        if pending:
            self._fetch_regions(_merge([(p.header_offset, p.data_offset) for p in pending]))
            for p in pending:
                found = self._regions.find(p.header_offset, len(p.header))
                self._settle(p, bytes(found) if found is not None else b"")
        if self._mispredicted is not None:
            raise Mispredicted(f"{self.url}: {self._mispredicted}")

    def forget_predictions(self) -> None:
        """Drops every prediction: the next zip_directory_source fetches the real headers."""
        self.predict_headers = False
        self._predicted.clear()
        self._mispredicted = None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=True)
            close = getattr(self._transport, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> RemoteSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteSource({self.url!r}, size={self._size})"

    # -- the zip container ----------------------------------------------------------------
    def zip_directory_source(self) -> Any:
        """A ``_core.io.BufferSource`` for ``_core.zip.read_zip_directory`` holding every byte
        it reads of this archive (module docstring), fetched in at most two rounds of GETs
        beyond the opening one."""
        if self._size == 0:
            return _core.io.BufferSource(b"", self.name)
        tail_start = max(0, self._size - self._tail_bytes)
        tail = self._regions.find(tail_start, self._size - tail_start)
        cd_offset, cd_size = (0, 0)
        if tail is not None:
            cd_offset, cd_size = _zip.central_directory_span(bytes(tail), tail_start)
        predicted: dict[str, _zip.Prediction] = {}
        if 0 < cd_size and cd_offset + cd_size <= self._size:
            directory = self._regions.find(cd_offset, cd_size)
            raw = bytes(directory) if directory is not None else self.pread(cd_offset, cd_size)
            records = _zip.entries(raw)
            storages = frozenset(e.name for e in records if _zip.is_storage(e.name))
            skip = storages if self.predict_headers else frozenset()
            self._fetch_regions(_merge(_zip.header_regions(records, cd_offset, skip)))
            if skip:
                predicted = self._predict(records, cd_offset) or {}
                if len(predicted) != len(storages):  # not the writer's layout: fetch them
                    predicted = {}
                    self._fetch_regions(_merge(_zip.header_regions(records, cd_offset)))
        sparse = mmap.mmap(
            -1, self._size, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_NORESERVE", 0)
        )
        for start, data in self._regions.items():
            sparse[start : start + len(data)] = data
        for p in predicted.values():
            sparse[p.header_offset : p.header_offset + len(p.header)] = p.header
        self._predicted = {p.data_offset: p for p in predicted.values()}
        return _core.io.BufferSource(memoryview(sparse), self.name)

    def _predict(self, records: list[_zip.Entry], end: int) -> dict[str, _zip.Prediction] | None:
        """The storages' predicted headers (module docstring), the ``.storage_alignment``
        record read from the fetched bytes."""
        alignment = None
        for e in records:
            if e.name.endswith("/.storage_alignment") and e.size <= 16:
                head = self._regions.find(e.header_offset, 30)
                start = None if head is None else _zip.data_offset(head, e.header_offset)
                if start is not None:
                    found = self._regions.find(start, e.size)
                    alignment = _zip.storage_alignment(bytes(found) if found is not None else None)
        return _zip.predict_storage_headers(records, end, alignment)

    def _fetch_regions(self, regions: list[tuple[int, int]]) -> None:
        """Fetches and caches the (start, stop) regions not cached yet, concurrently."""
        missing = self._regions.missing(regions)
        if not missing:
            return
        buffers = [bytearray(b - a) for a, b in missing]
        jobs = [
            _Job(a, b, [(a, _address_of(buf), b - a)])
            for (a, b), buf in zip(missing, buffers, strict=True)
        ]
        self._run(jobs)
        for (a, _), buf in zip(missing, buffers, strict=True):
            self._regions.add(a, bytes(buf))

    # -- opening --------------------------------------------------------------------------
    def _probe(self, probe_bytes: int) -> None:
        """Size, ETag, head and tail in one round trip (two concurrent GETs)."""
        head = self._pool.submit(
            self._retrying,
            "the first bytes",
            lambda: self._probe_get(f"bytes=0-{probe_bytes - 1}", probe_bytes),
        )
        tail = self._pool.submit(
            self._retrying,
            "the last bytes",
            lambda: self._probe_get(f"bytes=-{probe_bytes}", probe_bytes),
        )
        results = []
        for future in (head, tail):
            results.append(future.result())
        (h_start, h_data, h_size, h_etag), (t_start, t_data, t_size, t_etag) = results
        if h_size and not t_size and t_etag is None:
            # A 416 to the suffix range of an object that has bytes: some servers (rclone's
            # serve s3) refuse a suffix longer than the object instead of sending it whole.
            if len(h_data) == h_size:
                t_start, t_data, t_size, t_etag = h_start, h_data, h_size, h_etag
            else:  # ask for the same bytes by offsets: one more round trip, on those only
                first = max(0, h_size - probe_bytes)
                t_start, t_data, t_size, t_etag = self._retrying(
                    "the last bytes",
                    lambda: self._probe_get(f"bytes={first}-{h_size - 1}", probe_bytes),
                )
        if h_size != t_size or (h_etag and t_etag and h_etag != t_etag):
            raise OSError(
                errno.ESTALE,
                f"the object changed while it was opened (size {h_size} then {t_size}, ETag "
                f"{h_etag} then {t_etag})",
                self.url,
            )
        self._size = h_size
        # An empty ETag ("", as rclone's serve s3 sends with --etag-hash off) names no
        # version: nothing to ask for with If-Match, nothing for a cache to validate by.
        etag = h_etag or t_etag
        self._etag = etag if etag and etag.strip('"') else None
        self._tail_bytes = probe_bytes
        self._regions.add(h_start, h_data)
        self._regions.add(t_start, t_data)

    def _probe_get(self, byte_range: str, probe_bytes: int) -> tuple[int, bytes, int, str | None]:
        """(start, bytes, object size, ETag) of one opening GET."""
        try:
            reply = self._transport.get(byte_range, None)
        except RangeNotSatisfiable:
            return 0, b"", 0, None  # only an empty object has no byte 0
        try:
            if reply.content_range is None and reply.status == 200:
                # No Content-Range: the whole object. Fine while it is small; a large one
                # would have to be downloaded whole for every range read. (A Content-Range
                # says which bytes came, whatever the status: some stores send 200 with it.)
                size = reply.content_length
                if size is None or size > probe_bytes:
                    raise _RangeIgnored(
                        f"the server answered a ranged GET ({byte_range}) with the whole "
                        f"object (200, {size} bytes): it does not serve byte ranges; download "
                        "the file and load it locally"
                    )
                data = bytearray(size)
                self._read_exact(reply, memoryview(data), 0, size)
                _expect_end(reply)
                reply.release()
                return 0, bytes(data), size, reply.etag
            if reply.content_range is None or reply.content_range[2] is None:
                raise Transient(f"a 206 answer without a usable Content-Range ({byte_range})")
            first, last, total = reply.content_range
            assert total is not None
            length = last - first + 1
            if reply.content_length is not None and reply.content_length != length:
                raise Transient(
                    f"Content-Length {reply.content_length} for bytes {first}-{last} "
                    f"({length} bytes)"
                )
            data = bytearray(length)
            self._read_exact(reply, memoryview(data), first, length)
            reply.release()
            return first, bytes(data), total, reply.etag
        except BaseException:
            reply.close()
            raise

    # -- reading ----------------------------------------------------------------------------
    def _run(self, jobs: list[_Job]) -> None:
        """Runs `jobs` on the pool and waits for every one; raises the error of the first
        failed job in object order (so the message does not depend on scheduling)."""
        if self._closed:
            raise ValueError(f"{self.url}: read from a closed source")
        if len(jobs) == 1:
            self._retrying(_range_name(jobs[0]), lambda: self._get_job(jobs[0]))
            return
        futures = [
            self._pool.submit(self._retrying, _range_name(job), _bind(self._get_job, job))
            for job in jobs
        ]
        cf.wait(futures)
        for future in futures:
            error = future.exception()
            if error is not None:
                raise error

    def _get_job(self, job: _Job) -> None:
        length = job.stop - job.start
        with self._budget:
            while self._inflight and self._inflight + length > self._inflight_limit:
                self._budget.wait()
            self._inflight += length
        try:
            reply = self._transport.get(f"bytes={job.start}-{job.stop - 1}", self._if_match())
            try:
                self._check_reply(reply, job.start, job.stop)
                at = job.start
                for offset, address, n in job.pieces:
                    if offset > at:
                        self._skip(reply, offset - at, at)
                    view = _core.io.raw_memoryview(address, n, readonly=False)
                    self._read_exact(reply, view, offset, length)
                    at = offset + n
                if at < job.stop:
                    self._skip(reply, job.stop - at, at)
                reply.release()
            except BaseException:
                reply.close()
                raise
        finally:
            with self._budget:
                self._inflight -= length
                self._budget.notify_all()

    def _if_match(self) -> str | None:
        etag = self._etag
        return etag if etag and not etag.startswith("W/") else None  # weak: no If-Match

    def _check_reply(self, reply: Reply, start: int, stop: int) -> None:
        # The Content-Range says which bytes came (a 206; some stores answer 200 with one).
        if reply.content_range is None:
            raise _RangeIgnored(
                f"the server answered a GET of bytes {start}-{stop - 1} with "
                f"{reply.status} and no Content-Range: it does not serve byte ranges; "
                "download the file and load it locally"
            )
        if reply.etag and self._etag and reply.etag != self._etag:
            raise Changed(f"ETag {self._etag} when opened, {reply.etag} now")
        first, last, total = reply.content_range
        if total is not None and total != self._size:
            raise Changed(f"{self._size} bytes when opened, {total} now")
        if (first, last + 1) != (start, stop):
            raise Transient(f"the server sent bytes {first}-{last}")
        if reply.content_length is not None and reply.content_length != stop - start:
            raise Transient(
                f"Content-Length {reply.content_length} for a range of {stop - start} bytes"
            )

    def _read_exact(self, reply: Reply, view: memoryview, offset: int, expected: int) -> None:
        got = 0
        while got < len(view):
            try:
                n = reply.readinto(view[got:])
            except Exception as e:  # the body's I/O: resets, timeouts, IncompleteRead...
                raise Transient(f"{type(e).__name__} while reading the body: {e}") from e
            if not n:
                raise Transient(
                    f"the body ended {len(view) - got} bytes early (at offset {offset + got}; "
                    f"{expected} bytes were announced)"
                )
            got += n

    def _skip(self, reply: Reply, n: int, offset: int) -> None:
        scratch = memoryview(bytearray(min(n, 1 << 16)))
        while n:
            step = min(n, len(scratch))
            self._read_exact(reply, scratch[:step], offset, step)
            n -= step
            offset += step

    def _retrying(self, what: str, attempt: Callable[[], T]) -> T:
        return retrying(self.url, what, attempt, self._attempts, self._backoff)

    def _check_range(self, offset: int, n: int) -> None:
        if offset < 0 or n < 0 or offset + n > self._size:
            raise CheckpointError(
                f"{self.name}: truncated: wanted {n} bytes at offset {offset}, file has "
                f"{self._size} bytes"
            )


def retrying(url: str, what: str, attempt: Callable[[], T], attempts: int, backoff: float) -> T:
    """`attempt()` (one request about `url`), tried up to `attempts` times on transient
    faults with exponential backoff from `backoff` seconds (with jitter); the protocol's
    failures become the errors the module docstring lists."""
    delay = backoff
    for i in range(1, attempts + 1):
        try:
            return attempt()
        except Transient as e:
            if i == attempts:
                raise OSError(errno.EIO, f"{what}: {e} (gave up after {i} attempts)", url) from e
            time.sleep(delay * (0.5 + random.random()))
            delay *= 2
        except NotFound as e:
            raise FileNotFoundError(errno.ENOENT, f"no such object ({e})", url) from e
        except Forbidden as e:
            raise PermissionError(errno.EACCES, f"access denied ({e})", url) from e
        except Changed as e:
            raise OSError(
                errno.ESTALE,
                f"{what}: the object changed while it was read ({e}); load it again",
                url,
            ) from e
        except _RangeIgnored as e:
            raise OSError(errno.EIO, str(e), url) from e
        except (Unexpected, RangeNotSatisfiable) as e:
            raise OSError(errno.EIO, f"{what}: {e}", url) from e
    raise AssertionError("unreachable")


class _RangeIgnored(Exception):
    """A 200 with the whole object where a range was asked for: never retried."""


def _expect_end(reply: Reply) -> None:
    """The body must end here (a 200's Content-Length was honoured)."""
    try:
        extra = reply.readinto(memoryview(bytearray(1)))
    except Exception as e:
        raise Transient(f"{type(e).__name__} at the end of the body: {e}") from e
    if extra:
        raise Transient("the body is longer than its Content-Length")


def _range_name(job: _Job) -> str:
    return f"bytes {job.start}-{job.stop - 1}"


def _bind(fn: Callable[[_Job], None], job: _Job) -> Callable[[], None]:
    return lambda: fn(job)


def _address_of(buffer: bytearray) -> int:
    """The address of a bytearray's bytes (kept alive by the caller)."""
    import ctypes

    return ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))


def _merge(regions: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """`regions` sorted and merged across gaps of HEADER_GAP, the gap grown until at most
    MAX_HEADER_GETS remain."""
    gap = HEADER_GAP
    while True:
        merged: list[tuple[int, int]] = []
        for a, b in sorted(regions):
            if merged and a <= merged[-1][1] + gap:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        if len(merged) <= MAX_HEADER_GETS or gap >= 16 << 20:
            return merged
        gap *= 4
