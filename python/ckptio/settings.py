"""Every tuning knob of ckptio, in one place.

Each knob has a default, a ``CKPTIO_*`` environment variable read at import, a setter
(:func:`set_options`) and a context manager (:func:`options`). docs/settings.md lists them.

Example::

    import ckptio
    ckptio.set_options(threads=8)
    with ckptio.options(write_crc32=True):
        ckptio.save(state_dict, "model.pt")
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import threading
from typing import Any, Iterator

__all__ = ["Options", "get_options", "options", "set_options"]


def _default_threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 16))


#: VIRTIO_BALLOON_F_REPORTING: the guest reports free memory to the host, which takes it back.
_BALLOON_FREE_PAGE_REPORTING_BIT = 5


def _host_takes_back_free_memory(sysfs: str = "/sys") -> bool:
    """True inside a VM whose virtio balloon reports free pages to the host (free page
    reporting), which then takes that memory back. The guest reports free blocks of 2 MiB and
    up, so a fresh huge page is memory the host must fault in again, while 4 KiB pages still
    come from the smaller free fragments it kept. On such a VM the first load of a process
    faults in huge pages 3-4x slower than 4 KiB ones (docs/settings.md), so ``huge_pages``
    defaults to off there."""
    for path in glob.glob(
        os.path.join(sysfs, "bus/virtio/drivers/virtio_balloon/virtio*/features")
    ):
        try:
            with open(path) as f:
                bits = f.read().strip()  # one '0'/'1' per feature bit, bit 0 first
        except OSError:
            continue
        if (
            len(bits) > _BALLOON_FREE_PAGE_REPORTING_BIT
            and bits[_BALLOON_FREE_PAGE_REPORTING_BIT] == "1"
        ):
            return True
    return False


def _default_huge_pages() -> bool:
    return not _host_takes_back_free_memory()


#: S3's smallest part of a multipart upload (all but the last): the least value of
#: ``remote_part_bytes`` (tests lower it against a server that allows smaller parts).
MIN_REMOTE_PART_BYTES = 5 << 20


@dataclasses.dataclass(frozen=True)
class Options:
    """The knobs. Values are validated by :func:`set_options` and :func:`options`."""

    #: Parallel I/O threads (the calling thread included). Env: ``CKPTIO_THREADS``.
    threads: int = dataclasses.field(default_factory=_default_threads)
    #: Bytes one I/O task moves; big storages are split into chunks of this size, small ones
    #: grouped up to it (saves from host memory use ``write_chunk_bytes``). Env:
    #: ``CKPTIO_CHUNK_BYTES``.
    chunk_bytes: int = 8 << 20
    #: Most bytes one write call of a save moves: records lying end to end go out together,
    #: larger ones are split. Fewer, larger page-cache writes were up to 3x faster than 8 MiB
    #: ones on the development VM (docs/settings.md). Env: ``CKPTIO_WRITE_CHUNK_BYTES``.
    write_chunk_bytes: int = 64 << 20
    #: Record alignment of ``data/*`` payloads in files ckptio writes (a power of two, at most
    #: 32768). Env: ``CKPTIO_DATA_ALIGNMENT``.
    data_alignment: int = 4096
    #: Record the CRC-32 of every record in the zip files ckptio writes (save, async_save, the
    #: DCP writer, torch shards of a directory), computed from the buffers being written, so
    #: that ``load(verify=True)``, ``ckptio verify`` and zip tools can check the bytes. Off by
    #: default: it measured +20-35% save time on the development VM (docs/verify.md). Env:
    #: ``CKPTIO_WRITE_CRC32`` (``CKPTIO_CRC32``, its former name, is still read); the former
    #: option name ``crc32`` is accepted by :func:`options` and :func:`set_options`.
    write_crc32: bool = False
    #: Loads check every record's stored CRC-32 (and a directory's or safetensors file's
    #: manifest) against the bytes read, raising CheckpointError naming the file and tensor on
    #: a mismatch; ``load(verify=...)`` overrides it per call (docs/verify.md). Env:
    #: ``CKPTIO_VERIFY``.
    verify: bool = False
    #: fsync the file, then its directory after the rename, before save returns: a power loss
    #: after save returns cannot lose the checkpoint (costs a disk flush; docs/training.md).
    #: Env: ``CKPTIO_DURABLE`` (``CKPTIO_FSYNC``, its former name, is still read).
    durable: bool = False
    #: Reserve the file's full size before writing (a full disk fails early). Env:
    #: ``CKPTIO_PREALLOCATE``.
    preallocate: bool = True
    #: Back large storages of eager loads with transparent huge pages (fewer first-touch page
    #: faults and TLB misses). Off by default in VMs whose host takes back free memory
    #: (:func:`_host_takes_back_free_memory`). Env: ``CKPTIO_HUGE_PAGES``.
    huge_pages: bool = dataclasses.field(default_factory=_default_huge_pages)
    #: Eager loads read the small storages (under 1 MiB) on a background thread while
    #: data.pkl is unpickled, instead of after it. Env: ``CKPTIO_OVERLAP_READS``.
    overlap_reads: bool = True
    #: Eager loads put storages of 2 MiB or more, and the block of their small storages, in
    #: mappings of ckptio's own that, once freed, are kept for later loads that need blocks of
    #: those sizes; one idle for ``recycle_idle_seconds`` is marked MADV_FREE (the kernel
    #: takes it back under memory pressure). Env: ``CKPTIO_RECYCLE_MEMORY``.
    recycle_memory: bool = True
    #: Most bytes of freed mappings kept for reuse (``recycle_memory``); the oldest go first.
    #: Env: ``CKPTIO_RECYCLE_MAX_BYTES``.
    recycle_max_bytes: int = 2 << 30
    #: Seconds a freed mapping kept for reuse stays as it is before it is marked MADV_FREE:
    #: reusing it sooner writes pages the kernel was not told it may take (faster); after,
    #: the kernel may take them back under memory pressure (set by the load that frees it).
    #: Env: ``CKPTIO_RECYCLE_IDLE_SECONDS``.
    recycle_idle_seconds: float = 10.0
    #: Bytes of one pinned host staging buffer for GPU loads and saves (storages bigger than
    #: this stream through in pieces; small ones share a buffer). Env:
    #: ``CKPTIO_STAGING_BUFFER_BYTES``.
    staging_buffer_bytes: int = 32 << 20
    #: Staging buffers in the ring: host memory a GPU load or save uses is at most
    #: ``staging_buffers * staging_buffer_bytes``. Env: ``CKPTIO_STAGING_BUFFERS``.
    staging_buffers: int = 4
    #: Most :func:`ckptio.async_save` calls in flight (each holds one staging buffer, a copy
    #: of its tensors); one more waits for the oldest. Env: ``CKPTIO_ASYNC_MAX_PENDING``.
    async_max_pending: int = 2
    #: Most bytes of ranged GETs in flight at once from one remote source (``s3://``,
    #: ``http(s)://``); with ``chunk_bytes`` it also sets how many GETs run concurrently
    #: (``remote_inflight_bytes // chunk_bytes``, 2 to 64; docs/remote.md). Env:
    #: ``CKPTIO_REMOTE_INFLIGHT_BYTES``.
    remote_inflight_bytes: int = 128 << 20
    #: Bytes of one part of a save to ``s3://`` (a multipart upload; at least 5 MiB, S3's
    #: smallest part, at most 5 GiB); the size doubles after every 1,000 parts, so any object
    #: fits in S3's 10,000. Parts being sent hold at most ``remote_inflight_bytes`` (at least
    #: one part); docs/remote.md. Env: ``CKPTIO_REMOTE_PART_BYTES``.
    remote_part_bytes: int = 8 << 20
    #: A directory where loads of ``s3://`` and ``http(s)://`` URLs keep a local copy of each
    #: object, validated by its ETag and size on every load (a hit reads the local file);
    #: None: no cache. ``load(..., cache_dir=...)`` overrides it per call (docs/remote.md).
    #: Env: ``CKPTIO_REMOTE_CACHE_DIR`` (empty: none).
    remote_cache_dir: str | None = None

    @property
    def crc32(self) -> bool:
        """The former name of :attr:`write_crc32`."""
        return self.write_crc32

    def __post_init__(self) -> None:
        if not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 1:
            raise ValueError(f"threads must be an int >= 1, got {self.threads!r}")
        n = self.async_max_pending
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"async_max_pending must be an int >= 1, got {n!r}")
        for name in ("chunk_bytes", "write_chunk_bytes"):
            n = getattr(self, name)
            if not isinstance(n, int) or isinstance(n, bool) or n < 4096:
                raise ValueError(f"{name} must be an int >= 4096, got {n!r}")
        a = self.data_alignment
        if not isinstance(a, int) or a < 1 or a > 32768 or a & (a - 1):
            raise ValueError(f"data_alignment must be a power of two <= 32768, got {a!r}")
        b = self.staging_buffer_bytes
        if not isinstance(b, int) or isinstance(b, bool) or b < 65536:
            raise ValueError(f"staging_buffer_bytes must be an int >= 65536, got {b!r}")
        n = self.recycle_max_bytes
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"recycle_max_bytes must be an int >= 0, got {n!r}")
        t = self.recycle_idle_seconds
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1e9:
            raise ValueError(f"recycle_idle_seconds must be a number in [0, 1e9], got {t!r}")
        n = self.remote_inflight_bytes
        if not isinstance(n, int) or isinstance(n, bool) or n < self.chunk_bytes:
            raise ValueError(
                f"remote_inflight_bytes must be an int >= chunk_bytes ({self.chunk_bytes}), "
                f"got {n!r}"
            )
        d = self.remote_cache_dir
        if d is not None:
            if not isinstance(d, (str, os.PathLike)) or not os.fspath(d):
                raise ValueError(f"remote_cache_dir must be a path or None, got {d!r}")
            object.__setattr__(self, "remote_cache_dir", os.fsdecode(os.fspath(d)))
        n = self.remote_part_bytes
        if (
            not isinstance(n, int)
            or isinstance(n, bool)
            or not MIN_REMOTE_PART_BYTES <= n <= 5 << 30
        ):
            raise ValueError(
                f"remote_part_bytes must be an int in [{MIN_REMOTE_PART_BYTES}, 5 GiB], got {n!r}"
            )
        n = self.staging_buffers
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 1024:
            raise ValueError(f"staging_buffers must be an int in [1, 1024], got {n!r}")
        for name in (
            "write_crc32",
            "verify",
            "durable",
            "preallocate",
            "huge_pages",
            "overlap_reads",
            "recycle_memory",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")


_ENV = {
    "threads": "CKPTIO_THREADS",
    "chunk_bytes": "CKPTIO_CHUNK_BYTES",
    "write_chunk_bytes": "CKPTIO_WRITE_CHUNK_BYTES",
    "data_alignment": "CKPTIO_DATA_ALIGNMENT",
    "write_crc32": "CKPTIO_WRITE_CRC32",
    "verify": "CKPTIO_VERIFY",
    "durable": "CKPTIO_DURABLE",
    "preallocate": "CKPTIO_PREALLOCATE",
    "huge_pages": "CKPTIO_HUGE_PAGES",
    "overlap_reads": "CKPTIO_OVERLAP_READS",
    "recycle_memory": "CKPTIO_RECYCLE_MEMORY",
    "recycle_max_bytes": "CKPTIO_RECYCLE_MAX_BYTES",
    "recycle_idle_seconds": "CKPTIO_RECYCLE_IDLE_SECONDS",
    "staging_buffer_bytes": "CKPTIO_STAGING_BUFFER_BYTES",
    "staging_buffers": "CKPTIO_STAGING_BUFFERS",
    "async_max_pending": "CKPTIO_ASYNC_MAX_PENDING",
    "remote_inflight_bytes": "CKPTIO_REMOTE_INFLIGHT_BYTES",
    "remote_part_bytes": "CKPTIO_REMOTE_PART_BYTES",
    "remote_cache_dir": "CKPTIO_REMOTE_CACHE_DIR",
}
#: The type of settings whose default (None) does not tell it.
_KINDS: dict[str, type] = {"remote_cache_dir": str}
#: Former names of environment variables, read when the current name is not set.
_ENV_ALIASES = {"durable": "CKPTIO_FSYNC", "write_crc32": "CKPTIO_CRC32"}
#: Former option names, accepted by set_options() and options().
_NAME_ALIASES = {"crc32": "write_crc32"}
_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n", ""}


def _parse_env(var: str, raw: str, kind: type) -> Any:
    if kind is str:
        return raw or None
    if kind is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"{var}={raw!r}: expected one of 1/0, true/false, yes/no")
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{var}={raw!r}: expected a number") from None
    try:
        return int(raw, 0)
    except ValueError:
        raise ValueError(f"{var}={raw!r}: expected an integer") from None


def _from_environment() -> Options:
    values: dict[str, Any] = {}
    defaults = Options()
    for name, var in _ENV.items():
        raw = os.environ.get(var)
        if raw is None and name in _ENV_ALIASES:
            var = _ENV_ALIASES[name]
            raw = os.environ.get(var)
        if raw is not None:
            kind = _KINDS.get(name, type(getattr(defaults, name)))
            values[name] = _parse_env(var, raw, kind)
    return dataclasses.replace(defaults, **values)


_lock = threading.Lock()
_global = _from_environment()
_local = threading.local()


def get_options() -> Options:
    """The options in force for the calling thread."""
    return getattr(_local, "options", None) or _global


def set_options(**changes: Any) -> Options:
    """Changes options process-wide (threads inside an :func:`options` block keep theirs)."""
    global _global
    with _lock:
        _global = dataclasses.replace(_global, **_check_names(changes))
        return _global


@contextlib.contextmanager
def options(**changes: Any) -> Iterator[Options]:
    """Overrides options for the calling thread inside a ``with`` block."""
    previous = getattr(_local, "options", None)
    _local.options = dataclasses.replace(get_options(), **_check_names(changes))
    try:
        yield _local.options
    finally:
        _local.options = previous


def _check_names(changes: dict[str, Any]) -> dict[str, Any]:
    for old, new in _NAME_ALIASES.items():
        if old in changes:
            if new in changes:
                raise TypeError(f"ckptio option {old!r} is the former name of {new!r}: pass one")
            changes = {(new if k == old else k): v for k, v in changes.items()}
    unknown = set(changes) - set(_ENV)
    if unknown:
        raise TypeError(
            f"unknown ckptio option(s): {', '.join(sorted(unknown))}; known: {', '.join(_ENV)}"
        )
    return changes
