"""Checkpoints in object storage: ``s3://bucket/key`` and ``http(s)://`` URLs as sources of
the read engine (docs/remote.md).

``import ckptio`` imports this package but none of the client libraries: botocore (S3) and
urllib3 (HTTP) are imported when the first URL of their kind is opened, from the optional
extras ``pip install 'ckptio[s3]'`` / ``'ckptio[http]'``.
"""

from __future__ import annotations

from typing import Any, Mapping, cast

from ._source import RemoteSource, connections

__all__ = [
    "RemoteSource",
    "connections",
    "is_directory_url",
    "is_url",
    "list_names",
    "open_source",
    "read_whole",
    "source_for",
]

_SCHEMES = ("s3://", "http://", "https://")
#: storage_options every source takes: tries per request (transient faults only), the first
#: backoff in seconds (doubled after each retry), bytes fetched from each end on opening.
_SOURCE_OPTIONS = {"retries": 5, "retry_backoff": 0.2, "probe_bytes": 1 << 20}


def is_url(f: object) -> bool:
    """Whether `f` is a URL ckptio reads remotely (``s3://``, ``http://``, ``https://``)."""
    return isinstance(f, str) and f.startswith(_SCHEMES)


def source_for(
    f: object, storage_options: Mapping[str, Any] | None, what: str, mmap: bool
) -> RemoteSource | None:
    """The opened remote source when `f` is a URL (None for anything else), for the entry
    point `what` (load, open, load_into); None too for the URL of a model directory or index
    (``_directory`` reads those). Refuses ``mmap=True``, and storage_options given with a
    local path."""
    if not is_url(f):
        if storage_options is not None:
            raise ValueError(
                f"{what}: storage_options applies to s3:// and http(s):// URLs, not to {f!r}"
            )
        return None
    assert isinstance(f, str)
    if is_directory_url(f):
        return None  # a model directory: _directory reads its index, then each shard's URL
    if mmap:
        raise ValueError(
            f"{f}: mmap=True needs a local file; a remote object is read into memory by "
            "ranged GETs (load it without mmap, or with cache_dir= to map a local copy)"
        )
    return open_source(f, storage_options)


def is_directory_url(f: object) -> bool:
    """Whether `f` is the URL of a model directory (ends with ``/``) or of its index
    (``*.index.json``), which ``_directory`` resolves."""
    return is_url(f) and cast(str, f).endswith(("/", ".index.json"))


def list_names(url: str, storage_options: Mapping[str, Any] | None) -> list[str] | None:
    """The names of the objects directly in the directory URL `url` (``s3://bucket/dir/``),
    or None for HTTP, which has no listing."""
    if not url.startswith("s3://"):
        return None
    from . import _s3

    options, common = split_options(url, storage_options)
    return _s3.list_names(url, options, int(common["retries"]), float(common["retry_backoff"]))


def read_whole(url: str, storage_options: Mapping[str, Any] | None, limit: int) -> bytes:
    """The bytes of the (small) object at `url`; ValueError when it holds more than `limit`."""
    with open_source(url, storage_options) as source:
        if source.size > limit:
            raise ValueError(f"{url}: {source.size} bytes, more than the {limit} read here")
        return source.pread(0, source.size)


def open_source(url: str, storage_options: Mapping[str, Any] | None = None) -> RemoteSource:
    """Opens the object at `url` (one round trip: its size, ETag, first and last bytes).

    `storage_options` (all optional): ``retries`` (5), ``retry_backoff`` (0.2 s),
    ``probe_bytes`` (1 MiB); for ``s3://``: ``endpoint_url``, ``region_name``, ``anon``,
    ``profile``, ``aws_access_key_id``, ``aws_secret_access_key``, ``aws_session_token``,
    ``addressing_style``, ``connect_timeout``, ``read_timeout``, ``verify``; for ``http(s)://``:
    ``headers``, ``connect_timeout``, ``read_timeout``, ``verify``. Unknown names raise
    TypeError.
    """
    options, common = split_options(url, storage_options)
    transport = transport_for(url, options, connections())
    return RemoteSource(
        transport,
        attempts=int(common["retries"]),
        backoff=float(common["retry_backoff"]),
        probe_bytes=int(common["probe_bytes"]),
    )


def split_options(
    url: str, storage_options: Mapping[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the protocol's options, the options every source takes, defaults filled in) of
    `storage_options` for `url`; an unknown name raises TypeError listing the known ones."""
    options = dict(storage_options or {})
    common = {k: options.pop(k, v) for k, v in _SOURCE_OPTIONS.items()}
    unknown = sorted(set(options) - _protocol(url).OPTIONS)
    if unknown:
        everything = sorted(_protocol(url).OPTIONS | set(_SOURCE_OPTIONS))
        raise TypeError(
            f"{url}: unknown storage_options {', '.join(unknown)}; known: {', '.join(everything)}"
        )
    return options, common


def transport_for(url: str, options: dict[str, Any], connections: int) -> Any:
    """The transport (``_s3.S3Transport``, ``_http.HTTPTransport``) of `url`, with the
    protocol's `options` (:func:`split_options`), pooling up to `connections`."""
    module = _protocol(url)
    if module.__name__.endswith("_s3"):
        return module.S3Transport(url, options, connections)
    return module.HTTPTransport(url, options, connections)


def _protocol(url: str) -> Any:
    """The module of `url`'s protocol (imported on first use: botocore, urllib3)."""
    if url.startswith("s3://"):
        from . import _s3

        return _s3
    if url.startswith(("http://", "https://")):
        from . import _http

        return _http
    raise ValueError(f"{url}: not a URL ckptio reads (s3://, http://, https://)")
