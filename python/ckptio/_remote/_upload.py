"""Saving to object storage: ``ckptio.save(obj, "s3://bucket/key")`` and ``async_save``.

A save to an ``s3://`` URL runs the same writer as a save into a writable file object (the
archive's records, or a safetensors file, written in file order; CUDA storages copied to the
host one at a time) into :class:`PartWriter`, a file object that cuts the bytes into parts
and uploads them while the writer goes on:

* The bytes are copied into a part buffer of ``remote_part_bytes`` (settings); a full buffer
  becomes the next part of a multipart upload (CreateMultipartUpload on the first), sent by
  UploadPart from a pool of threads. Parts being sent hold at most ``remote_inflight_bytes``
  (at least one part): a write waits for room. No temporary file, and no copy of the whole
  object in memory.
* S3 allows 10,000 parts: the part size doubles after every 1,000 parts (from part 1,001),
  so an object of any size S3 stores fits, and objects under 1,000 parts keep the set size.
* An object smaller than one part is sent by one PutObject when the writer ends.
* CompleteMultipartUpload makes the object visible, all at once, when the writer has
  returned and every part is in; until then a reader of the key sees the previous object.
  On any failure (an object that cannot be pickled, a KeyboardInterrupt, a request that
  failed after its retries) the parts still in flight are waited for and the upload is
  aborted (AbortMultipartUpload), so no parts are left behind and the key keeps its previous
  object; the error is raised as it came.
* Every request is retried on transient faults as the reads' are (``_source.retrying``:
  ``retries`` tries, backoff from ``retry_backoff`` s, doubled) and its failures become the
  same errors: FileNotFoundError (no such bucket), PermissionError (401/403, no
  credentials), OSError EIO after the last try, each naming the URL.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import threading
from typing import Any, Callable, Mapping

from ..settings import Options, get_options
from ._source import connections

__all__ = ["MAX_PARTS", "PARTS_PER_SIZE", "PartWriter", "Upload", "part_size", "upload_for"]

#: Parts S3 allows in one multipart upload.
MAX_PARTS = 10_000
#: Largest part S3 accepts.
MAX_PART_BYTES = 5 << 30
#: Parts of one size before the part size doubles.
PARTS_PER_SIZE = 1_000


def part_size(number: int, base: int) -> int:
    """The size of part `number` (from 1) when parts start at `base` bytes: `base` for the
    first 1,000 parts, doubled after every 1,000 more, at most 5 GiB."""
    return min(MAX_PART_BYTES, base << ((number - 1) // PARTS_PER_SIZE))


def upload_for(f: object, storage_options: Mapping[str, Any] | None, what: str) -> Upload | None:
    """Where the entry point `what` (save, async_save) writes `f`: an :class:`Upload` for an
    ``s3://`` URL (its storage_options checked, its client made), None for anything else.
    Refuses ``http(s)://`` URLs and storage_options given with a local destination."""
    from . import _s3, is_url, split_options

    if not is_url(f):
        if storage_options is not None:
            raise ValueError(f"{what}: storage_options applies to s3:// URLs, not to {f!r}")
        return None
    assert isinstance(f, str)
    if not f.startswith("s3://"):
        raise ValueError(
            f"{f}: {what} writes to s3:// URLs only; http(s):// URLs can be loaded, not "
            "saved to (save to a local file, or to s3://bucket/key)"
        )
    _s3.split_s3_url(f)
    if f.endswith("/"):
        raise ValueError(f"{f}: {what} needs an object key, not a prefix ending with '/'")
    options, common = split_options(f, storage_options)
    return Upload(f, options, int(common["retries"]), float(common["retry_backoff"]))


class Upload:
    """A save's destination ``s3://bucket/key``: :meth:`write` runs a writer on a
    :class:`PartWriter` and completes the upload, or aborts it if anything fails."""

    def __init__(self, url: str, options: dict[str, Any], attempts: int, backoff: float) -> None:
        from . import _s3

        self.url = url
        self.bucket, self.key = _s3.split_s3_url(url)
        self.attempts = max(1, attempts)
        self.backoff = backoff
        opts = get_options()
        # The reads' connection count (the same options share one client and its pool), or
        # the parts' if more can be in flight.
        parts = opts.remote_inflight_bytes // opts.remote_part_bytes
        self.client = _s3.client_for(options, min(64, max(connections(), parts)))

    def write(self, write: Callable[[Any], object]) -> None:
        """`write(file object)`, its bytes uploaded to the URL; the object appears once
        `write` returned and every byte is stored, else the upload is aborted."""
        stream = PartWriter(self, get_options())
        try:
            write(stream)
            stream.commit()
        except BaseException as e:
            stream.abort(e)
            raise

    def request(self, what: str, operation: str, **kwargs: Any) -> Any:
        """One S3 request (`operation` of the client, on this bucket and key), retried on
        transient faults; failures raised as the reads' are."""
        from ._s3 import call
        from ._source import retrying

        method = getattr(self.client, operation)
        return retrying(
            self.url,
            what,
            lambda: call(method, Bucket=self.bucket, Key=self.key, **kwargs),
            self.attempts,
            self.backoff,
        )


class PartWriter:
    """A write-only, sequential file object whose bytes become the parts of one upload (see
    the module docstring). Not thread-safe: one writer writes it."""

    def __init__(self, upload: Upload, opts: Options) -> None:
        self._upload = upload
        self._base = opts.remote_part_bytes
        self._limit = max(opts.remote_inflight_bytes, self._base)
        self._buffer = bytearray(self._base)
        self._fill = 0
        self._offset = 0  # of the buffer's first byte in the object
        self._upload_id: str | None = None
        self._parts: list[cf.Future[str]] = []
        self._pool: cf.ThreadPoolExecutor | None = None
        self._cond = threading.Condition()
        self._inflight = 0
        self._error: BaseException | None = None
        self._free: list[bytearray] = []
        self._closed = False
        #: requests made, for tests: "put", "create", "part", "complete", "abort"
        self.requests: list[str] = []
        #: most bytes of parts in flight at once, for tests
        self.peak_inflight = 0

    # -- the file object --------------------------------------------------------------------
    def write(self, data: Any) -> int:
        if self._closed:
            raise ValueError(f"{self._upload.url}: write to a finished upload")
        self._raise_failure()
        view = memoryview(data).cast("B")
        n = view.nbytes
        while view.nbytes:
            take = min(len(self._buffer) - self._fill, view.nbytes)
            self._buffer[self._fill : self._fill + take] = view[:take]
            self._fill += take
            view = view[take:]
            if self._fill == len(self._buffer):
                self._ship()
        return n

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._offset + self._fill

    def flush(self) -> None:
        """Nothing to do: the bytes go out in parts."""

    @property
    def name(self) -> str:
        return self._upload.url

    @property
    def closed(self) -> bool:
        return self._closed

    # -- the upload ---------------------------------------------------------------------------
    def commit(self) -> None:
        """Sends what is left and makes the object visible (PutObject for an object smaller
        than one part, else the last part and CompleteMultipartUpload)."""
        upload = self._upload
        if self._upload_id is None:
            body = bytes(memoryview(self._buffer)[: self._fill])
            self.requests.append("put")
            upload.request(f"PutObject of {len(body)} bytes", "put_object", Body=body)
            self._closed = True
            return
        if self._fill:
            self._ship()
        etags = [part.result() for part in self._parts]  # the first failure, in part order
        self.requests.append("complete")
        upload.request(
            f"CompleteMultipartUpload of {len(etags)} parts",
            "complete_multipart_upload",
            UploadId=self._upload_id,
            MultipartUpload={
                "Parts": [{"ETag": e, "PartNumber": i} for i, e in enumerate(etags, 1)]
            },
        )
        self._upload_id = None
        self._finish_pool()

    def abort(self, error: BaseException) -> None:
        """After a failure: waits for the parts in flight (those not started are cancelled),
        then aborts the multipart upload. A failure to abort is noted on `error`."""
        self._closed = True
        for part in self._parts:
            part.cancel()
        self._finish_pool()
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is None:
            return
        self.requests.append("abort")
        try:
            self._upload.request(
                "AbortMultipartUpload", "abort_multipart_upload", UploadId=upload_id
            )
        except Exception as e:  # the first error stays the one raised
            error.add_note(
                f"ckptio: the multipart upload {upload_id} of {self._upload.url} could not be "
                f"aborted ({e}); its parts stay stored (and billed) until it is aborted or a "
                "bucket lifecycle rule removes it"
            )

    def _ship(self) -> None:
        """Sends the buffer as the next part (starting the multipart upload first)."""
        upload = self._upload
        if self._upload_id is None:
            self.requests.append("create")
            reply = upload.request("CreateMultipartUpload", "create_multipart_upload")
            self._upload_id = str(reply["UploadId"])
            workers = max(1, min(64, self._limit // self._base))
            self._pool = cf.ThreadPoolExecutor(workers, thread_name_prefix="ckptio-upload")
        number = len(self._parts) + 1
        if number > MAX_PARTS:
            raise OSError(
                errno.EFBIG,
                f"more than {MAX_PARTS} parts: the object is larger than a multipart upload "
                f"holds (raise remote_part_bytes, now {self._base})",
                upload.url,
            )
        body = self._buffer if self._fill == len(self._buffer) else self._buffer[: self._fill]
        size = len(body)
        with self._cond:
            while self._inflight and self._inflight + size > self._limit and not self._error:
                self._cond.wait()
        self._raise_failure()
        with self._cond:
            self._inflight += size
            self.peak_inflight = max(self.peak_inflight, self._inflight)
        start = self._offset
        assert self._pool is not None
        self.requests.append("part")
        self._parts.append(self._pool.submit(self._send_part, number, start, body))
        self._offset += size
        self._fill = 0
        self._buffer = self._new_buffer(part_size(number + 1, self._base))

    def _send_part(self, number: int, start: int, body: bytearray) -> str:
        try:
            reply = self._upload.request(
                f"part {number} (bytes {start}-{start + len(body) - 1})",
                "upload_part",
                UploadId=self._upload_id,
                PartNumber=number,
                Body=body,
            )
            return str(reply["ETag"])
        except BaseException as e:
            with self._cond:
                if self._error is None:
                    self._error = e
            raise
        finally:
            with self._cond:
                self._inflight -= len(body)
                self._free.append(body)
                self._cond.notify_all()

    def _new_buffer(self, size: int) -> bytearray:
        """A part buffer: one a sent part gave back when its size fits, else a new one."""
        with self._cond:
            while self._free:
                buffer = self._free.pop()
                if len(buffer) == size:
                    return buffer
        return bytearray(size)

    def _raise_failure(self) -> None:
        with self._cond:
            error = self._error
        if error is not None:
            raise error

    def _finish_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
