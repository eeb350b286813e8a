"""The local cache of remote objects (``cache_dir=``, the ``remote_cache_dir`` setting;
docs/remote.md, "Local cache").

One entry per object in the cache directory, named by a hash of the store's endpoint and the
normalized URL (:func:`entry_key`):

* ``<key>.data``: the object's bytes, read-only (0444; it is replaced, never written in
  place, so a mapping of it or a file open on it keeps the version it opened);
* ``<key>.json``: the sidecar: URL (without its query), endpoint, size, ETag, and the data
  file's inode, size and mtime when it was published (a data file that is not the one the
  sidecar describes, or that changed since, is no entry);
* ``<key>.lock``: an empty file whose ``flock`` serializes the fills of that key (it stays).

**A load** of a URL with a cache directory: with an entry, ``load`` and ``load_into`` read
its data file at once while a thread validates it (:func:`optimistic`, :class:`Hit`), and
keep the result only if the entry is current (``open`` validates first). The validation is
one GET of the object's first byte: its ``Content-Range`` gives the current size, and with
the ETag both match the sidecar: a hit, the local file's load is the result. Otherwise (no
entry, a stale or corrupted one) the process takes the key's lock (waiting while another
process fills it), looks again (another process may have just filled it: then a hit), and
fills: it opens the object as a
:class:`RemoteSource` (the usual opening round trip), streams it with the source's parallel
ranged GETs (each with ``If-Match``: the ETag it opened) into a temporary file in the cache
directory mapped into memory (``posix_fallocate`` first: a full disk is an OSError, never a
SIGBUS), makes it read-only, renames it to ``<key>.data``, then writes the sidecar (a
temporary and a rename). With the ``durable`` setting, the data file is fsynced before its
rename and the directory after the sidecar's.

**Several processes** filling one key: the lock makes one download while the others wait,
then find its entry and load it (one transfer for, e.g., the 8 ranks of a node). Every write
is to a temporary name and published by a rename, so a reader without the lock sees a whole
entry or none; a fill killed midway leaves only its temporary, which the next fill of that
key removes (``_files.stale_temp_names``'s rule: a temporary of a dead process of this host).

**Never a wrong file**: the object changing during the fill fails a GET's If-Match: the
source's ESTALE error, the temporary removed, no entry. An object without a strong ETag
(none, or a weak ``W/`` one) cannot be validated: it is loaded remotely, not cached, with a
warning. An object gone from the store (404) is FileNotFoundError, whatever the cache holds.
A cache directory that cannot be written (a full disk, a read-only file system) does not
fail the load: it is read from the store, with a warning.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import mmap as _mmap
import os
import threading
import urllib.parse
import warnings
from typing import Any, Iterator, Mapping

from .. import _files
from .._util import mmap_shared
from ..settings import get_options
from ._transport import (
    Changed,
    Forbidden,
    NotFound,
    RangeNotSatisfiable,
    Transient,
    Unexpected,
)

__all__ = ["Cache", "Hit", "entry_key", "optimistic", "resolve"]

#: Bumped when the layout changes: entries of another version are other keys.
LAYOUT_VERSION = 1


def resolve(
    f: Any,
    storage_options: Mapping[str, Any] | None,
    cache_dir: Any,
    what: str,
    mmap: bool,
    current: tuple[int, str] | None = None,
) -> tuple[Any, Mapping[str, Any] | None]:
    """(f, storage_options) for the entry point `what` (load, open, load_into) to read: when
    `f` is an object's URL and a cache directory is in force (`cache_dir`, else the
    ``remote_cache_dir`` setting), the path of its validated local copy and None; otherwise
    both unchanged. `cache_dir` with anything but a URL raises ValueError, as
    storage_options does. `current`: the object's (size, ETag) as just asked (a stale
    :class:`Hit`'s), so it is not asked again."""
    cache = _cache_for(f, cache_dir, what)
    if cache is None:
        return f, storage_options
    if mmap and mmap_shared():
        raise ValueError(
            f"{f}: a MAP_SHARED mapping (torch.serialization.set_default_mmap_options) of a "
            "cached object would write into the cache: load it with MAP_PRIVATE or without mmap"
        )
    try:
        path = cache.local_path(f, storage_options, current)
    except OSError as e:
        if e.filename == f:
            raise  # the store's error (every one names the URL)
        # The cache's own file system failed (a full disk, a read-only directory...): the
        # load goes on from the store, as it would without a cache.
        warnings.warn(f"{f}: not cached ({e}); loaded from the store", stacklevel=3)
        return f, storage_options
    if path is None:
        return f, storage_options
    return path, None


class Hit:
    """A cache entry loaded before it is validated (:func:`optimistic`): `path` is its data
    file; :meth:`valid` waits for the validating GET, run meanwhile in a thread, and says
    whether the object is still the one cached (False also when the GET failed: the caller
    then takes the usual path, which validates again and raises the store's error)."""

    def __init__(self, path: str, url: str, options: Mapping[str, Any] | None, entry: dict):
        self.path = path
        #: the object's (size, ETag) now, once validated (None: the GET told neither)
        self.current: tuple[int, str] | None = None
        self._answer: list[bool] = []
        self._thread = threading.Thread(
            target=self._validate, args=(url, options, entry), name="ckptio-cache-check"
        )
        self._thread.start()

    def _validate(self, url: str, options: Mapping[str, Any] | None, entry: dict) -> None:
        try:
            self.current = current = _current_version(url, options, entry)
            self._answer.append(current is not None and _matches(entry, current))
        except Exception:
            self._answer.append(False)

    def valid(self) -> bool:
        self._thread.join()
        return bool(self._answer and self._answer[0])


def optimistic(
    f: Any, storage_options: Mapping[str, Any] | None, cache_dir: Any, mmap: bool, what: str
) -> Hit | None:
    """A :class:`Hit` when `f` is an object's URL with an entry in the cache in force: the
    caller loads its local file while the entry is validated, and keeps the result only if
    :meth:`Hit.valid` (a hit then costs the local load, not the load plus a round trip and,
    in a fresh process, the client's set-up). None otherwise: :func:`resolve` decides."""
    cache = _cache_for(f, cache_dir, what)
    if cache is None or (mmap and mmap_shared()):
        return None
    key = entry_key(f, storage_options)
    entry = cache.entry(key)
    if entry is None:
        return None
    return Hit(cache.paths(key)[0], f, storage_options, entry)


def _cache_for(f: Any, cache_dir: Any, what: str) -> Cache | None:
    """The cache in force for `f` (`cache_dir`, else the ``remote_cache_dir`` setting) when
    `f` is the URL of an object; None for anything else (a local path, a model directory's or
    index's URL, no cache directory). `cache_dir` with anything but a URL raises ValueError,
    as storage_options does, for the entry point `what`."""
    from . import is_url

    if cache_dir is None:
        if not is_url(f):
            return None
        cache_dir = get_options().remote_cache_dir
        if cache_dir is None:
            return None
    elif not is_url(f):
        raise ValueError(f"{what}: cache_dir applies to s3:// and http(s):// URLs, not to {f!r}")
    if f.endswith(("/", ".index.json")):
        return None  # a model directory or its index: not cached (its shards may be)
    return Cache(os.fsdecode(os.fspath(cache_dir)))


def entry_key(url: str, storage_options: Mapping[str, Any] | None) -> str:
    """The name of `url`'s entry: a hash of the layout version, the store's endpoint (S3:
    ``endpoint_url`` of storage_options, else ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``,
    else AWS) and the normalized URL (HTTP: scheme and host lowercased, default port and
    fragment dropped; the query kept)."""
    return hashlib.sha256(
        f"{LAYOUT_VERSION}\n{_endpoint(url, storage_options)}\n{normalize_url(url)}".encode()
    ).hexdigest()[:40]


def normalize_url(url: str) -> str:
    if url.startswith("s3://"):
        return url
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is not None and (scheme, port) not in (("http", 80), ("https", 443)):
        host = f"{host}:{port}"
    return urllib.parse.urlunsplit((scheme, host, parts.path or "/", parts.query, ""))


def _endpoint(url: str, storage_options: Mapping[str, Any] | None) -> str:
    if not url.startswith("s3://"):
        return ""  # the host is in the URL
    endpoint = (storage_options or {}).get("endpoint_url") or (
        os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    )
    return str(endpoint).rstrip("/").lower()


class Cache:
    """A cache directory (created when first needed)."""

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(os.path.expanduser(directory))

    def paths(self, key: str) -> tuple[str, str, str]:
        """(data, sidecar, lock) of entry `key`."""
        base = os.path.join(self.directory, key)
        return base + ".data", base + ".json", base + ".lock"

    def local_path(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None,
        known: tuple[int, str] | None = None,
    ) -> str | None:
        """The path of the validated (or just filled) local copy of `url`; None for an
        object that cannot be cached (no strong ETag: loaded remotely)."""
        from . import open_source

        key = entry_key(url, storage_options)
        data_path, meta_path, lock_path = self.paths(key)
        current: tuple[int, str] | None = known
        entry = self.entry(key)
        if entry is not None:
            current = current or _current_version(url, storage_options, entry)
            if current is not None and _matches(entry, current):
                return data_path  # a hit
        os.makedirs(self.directory, exist_ok=True)
        with _locked(lock_path):
            entry = self.entry(key)
            if entry is not None:  # filled while this process waited?
                if current is None:
                    current = _current_version(url, storage_options, entry)
                if current is not None and _matches(entry, current):
                    return data_path
            self._remove_stale(key)
            with open_source(url, storage_options) as source:
                etag = source.etag
                if not etag or etag.startswith("W/"):
                    warnings.warn(
                        f"{url}: not cached: the server gives no strong ETag to validate a "
                        f"cached copy by (ETag {etag!r}); loaded from the store",
                        stacklevel=4,
                    )
                    return None
                if entry is not None and _matches(entry, (source.size, etag)):
                    return data_path
                self._fill(source, key, url, storage_options)
        return data_path

    def entry(self, key: str) -> dict[str, Any] | None:
        """The sidecar of entry `key` when it describes the data file as it is now (its
        inode, size and mtime); None for no entry, or a corrupted or half-replaced one."""
        data_path, meta_path, _ = self.paths(key)
        try:
            with open(meta_path, "rb") as fh:
                meta = json.loads(fh.read(1 << 20))
            st = os.stat(data_path)
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("version") != LAYOUT_VERSION:
            return None
        stamp = [st.st_ino, st.st_size, st.st_mtime_ns]
        if meta.get("file") != stamp or meta.get("size") != st.st_size:
            return None
        return meta

    def _remove_stale(self, key: str) -> None:
        """Removes the temporaries of fills of `key` by dead processes (killed mid-fill);
        called with the key's lock held, so no live fill of this host is among them."""
        for name in (key + ".data", key + ".json"):
            _files.remove_stale_temp_files(self.directory, name)

    def _fill(
        self,
        source: Any,
        key: str,
        url: str,
        storage_options: Mapping[str, Any] | None,
    ) -> None:
        """Streams `source` into a temporary file, then publishes it as entry `key`."""
        data_path, meta_path, _ = self.paths(key)
        durable = get_options().durable
        tmp = os.path.join(self.directory, _files.temp_file_name(key + ".data", os.getpid()))
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                size = source.size
                if size:
                    _reserve(fd, size)
                    _stream(source, fd, size, storage_options)
                if durable:
                    os.fsync(fd)
                os.fchmod(fd, 0o444)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            os.rename(tmp, data_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        meta = {
            "version": LAYOUT_VERSION,
            "url": url.split("?", 1)[0],  # a query may hold a signature
            "endpoint": _endpoint(url, storage_options),
            "size": source.size,
            "etag": source.etag,
            "file": [st.st_ino, st.st_size, st.st_mtime_ns],
            # where S3 GETs went, signed (no credentials): validated without a client
            "signed_get": source.signed_get,
        }
        tmp_meta = os.path.join(self.directory, _files.temp_file_name(key + ".json", os.getpid()))
        try:
            with open(tmp_meta, "w", encoding="utf-8") as fh:
                json.dump(meta, fh)
                if durable:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.rename(tmp_meta, meta_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_meta)
            raise
        if durable:
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive flock on `path` (created if need be) while the block runs; the kernel
    releases it if the process dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _reserve(fd: int, size: int) -> None:
    """The file's blocks, reserved before it is mapped (a write to a mapping past a full
    disk is a SIGBUS); a file system without fallocate gets a sparse file."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        os.ftruncate(fd, size)


def _stream(source: Any, fd: int, size: int, storage_options: Mapping[str, Any] | None) -> None:
    """The object's bytes into the file `fd` of `size` bytes, by the source's concurrent
    ranged GETs written into a shared mapping of the file (the page cache: no copy in
    process memory). The first and last ``probe_bytes``, fetched when the source was
    opened, are copied from its cache instead of fetched again."""
    from . import _SOURCE_OPTIONS

    probe = int((storage_options or {}).get("probe_bytes", _SOURCE_OPTIONS["probe_bytes"]))
    head = min(max(probe, 0), size)
    tail = max(head, size - probe)
    requests = array.array("Q")
    for start, stop in ((0, head), (head, tail), (tail, size)):
        if stop > start:
            requests.extend((start, stop - start, start))
    mapping = _mmap.mmap(fd, size, _mmap.MAP_SHARED, _mmap.PROT_READ | _mmap.PROT_WRITE)
    try:
        pointer = (ctypes.c_char * size).from_buffer(mapping)
        try:
            opts = get_options()
            source.read_into(requests, opts.threads, opts.chunk_bytes, ctypes.addressof(pointer))
        finally:
            del pointer
    finally:
        mapping.close()


def _current_version(
    url: str, storage_options: Mapping[str, Any] | None, entry: Mapping[str, Any] | None = None
) -> tuple[int, str] | None:
    """(size, ETag) of the object now, from one GET of its first byte (its Content-Range
    gives the size); None when that fails or tells neither (the caller then opens the
    object, which raises the store's error if there is one). An S3 entry filled with signed
    GETs is asked at their URL first, without making a client (about 0.1 s of a hit's
    time); anything but a clear answer there asks again through the client."""
    from . import connections, split_options, transport_for

    options, _ = split_options(url, storage_options)
    target = (entry or {}).get("signed_get")
    if url.startswith("s3://") and isinstance(target, dict):
        from ._s3 import _SignedGets

        signed = _SignedGets.without_client(target, options)
        if signed is not None:
            try:
                current = _first_byte(signed)
            finally:
                signed.close()
            if current is not None:
                return current
    # S3: the reads' pool size, so the same options share one cached client with them.
    transport = transport_for(url, options, connections() if url.startswith("s3://") else 1)
    try:
        return _first_byte(transport)
    finally:
        close = getattr(transport, "close", None)
        if close is not None:
            close()


def _first_byte(transport: Any) -> tuple[int, str] | None:
    """(size, ETag) from `transport`'s GET of the first byte; None when it fails or its
    answer tells neither."""
    try:
        reply = transport.get("bytes=0-0", None)
    except (Changed, Forbidden, NotFound, RangeNotSatisfiable, Transient, Unexpected):
        return None
    try:
        if reply.readinto(memoryview(bytearray(1))) == 1 and reply.content_range:
            reply.release()
        else:
            reply.close()
    except Exception:
        reply.close()
        return None
    if reply.content_range is None:  # a 206, or a 200 that names its range (rclone's)
        return None
    total = reply.content_range[2]
    if total is None or not reply.etag:
        return None
    return total, reply.etag


def _matches(entry: Mapping[str, Any], current: tuple[int, str]) -> bool:
    size, etag = current
    return entry.get("size") == size and entry.get("etag") == etag and not etag.startswith("W/")
