"""Plain HTTP(S) objects (``http://``, ``https://``) through urllib3: a pool of keep-alive
connections per source, no automatic retries (the source retries, with its own backoff and
its own idea of what went wrong)."""

from __future__ import annotations

from typing import Any

from ._transport import (
    Changed,
    Forbidden,
    NotFound,
    RangeNotSatisfiable,
    Reply,
    Transient,
    Unexpected,
    Unreachable,
    parse_content_range,
    raw_body,
)

__all__ = ["HTTPTransport", "make_pool"]

#: storage_options an HTTP source takes (all optional).
OPTIONS = frozenset({"headers", "connect_timeout", "read_timeout", "verify"})


class HTTPTransport:
    """GETs of one URL. `options`: ``headers`` (added to every request: an Authorization
    header...), ``connect_timeout`` and ``read_timeout`` (seconds, default 10 and 60),
    ``verify`` (TLS certificate checks, default True; a path names a CA bundle)."""

    def __init__(
        self,
        url: str,
        options: dict[str, Any],
        connections: int,
        *,
        redirect: bool = True,
        pool: Any = None,
    ) -> None:
        self._urllib3 = _urllib3(url)
        self.url = url
        #: a pool given by the caller is the caller's to close
        self._own_pool = pool is None
        self._pool = pool if pool is not None else make_pool(options, connections)
        self._headers = {"Accept-Encoding": "identity", **dict(options.get("headers") or {})}
        self._redirect = redirect

    def get(self, byte_range: str | None, if_match: str | None) -> Reply:
        headers = dict(self._headers)
        if byte_range is not None:
            headers["Range"] = byte_range
        if if_match is not None:
            headers["If-Match"] = if_match
        return self.send(headers)

    def send(self, headers: dict[str, str]) -> Reply:
        """GETs the URL with exactly `headers` (``get`` adds the options' and the range's;
        the S3 transport signs its own)."""
        try:
            response = self._pool.request(
                "GET",
                self.url,
                headers=headers,
                preload_content=False,
                decode_content=False,
                redirect=self._redirect,
            )
        except (self._urllib3.exceptions.HTTPError, OSError) as e:
            raise Unreachable(f"{type(e).__name__}: {e}") from e
        status = response.status
        if status not in (200, 206):
            response.drain_conn()
            response.release_conn()
            _raise_for(status, response.reason)
        length = response.headers.get("Content-Length")
        readinto, release = raw_body(response)
        return Reply(
            status=status,
            content_range=parse_content_range(response.headers.get("Content-Range")),
            content_length=int(length) if length is not None and length.isdigit() else None,
            etag=response.headers.get("ETag"),
            readinto=readinto,
            release=release,
            close=response.close,
        )

    def close(self) -> None:
        if self._own_pool:
            self._pool.clear()


def make_pool(options: dict[str, Any], connections: int) -> Any:
    """A urllib3 pool of up to `connections` keep-alive connections per host, without
    retries, with the options' ``verify``, ``connect_timeout`` and ``read_timeout``."""
    urllib3 = _urllib3("a connection pool")
    verify = options.get("verify", True)
    tls: dict[str, Any] = {}
    if verify is False:
        tls["cert_reqs"] = "CERT_NONE"
    elif isinstance(verify, str):
        tls["ca_certs"] = verify
    return urllib3.PoolManager(
        num_pools=4,
        maxsize=max(1, connections),
        block=False,
        retries=False,
        timeout=urllib3.Timeout(
            connect=float(options.get("connect_timeout", 10)),
            read=float(options.get("read_timeout", 60)),
        ),
        **tls,
    )


def _urllib3(what: str) -> Any:
    try:
        import urllib3
    except ImportError as e:  # pragma: no cover - urllib3 comes with the s3 extra too
        raise ImportError(
            f"{what}: reading http(s) URLs needs urllib3: pip install 'ckptio[http]'"
        ) from e
    return urllib3


def _raise_for(status: int, reason: str | None) -> None:
    what = f"HTTP {status} {reason or ''}".rstrip()
    if status in (404, 410):
        raise NotFound(what)
    if status in (401, 403):
        raise Forbidden(what)
    if status == 412:
        raise Changed(what)
    if status == 416:
        raise RangeNotSatisfiable(what)
    if status == 429 or status >= 500:
        raise Transient(what)
    raise Unexpected(what)
