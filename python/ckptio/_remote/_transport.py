"""What the remote source needs of a protocol: one ranged GET, its reply, and the protocol's
failures sorted into the few kinds the source acts on (retry, or which error to raise).

Two transports implement it: S3 through botocore (``_s3.py``) and plain HTTP(S) through
urllib3 (``_http.py``). Both hand back the body as the ``http.client`` response under the
library's, when there is one: its ``readinto`` reads from the socket straight into the
destination, where urllib3's own ``readinto`` reads into a temporary ``bytes`` and copies it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Protocol

__all__ = [
    "Changed",
    "Forbidden",
    "NotFound",
    "RangeNotSatisfiable",
    "Reply",
    "Transient",
    "Transport",
    "Unexpected",
    "Unreachable",
    "parse_content_range",
]


class NotFound(Exception):
    """404: no such object (or bucket)."""


class Forbidden(Exception):
    """401/403: the credentials (or their absence) do not allow the read."""


class Changed(Exception):
    """412: the object no longer has the ETag the read started with (If-Match failed)."""


class RangeNotSatisfiable(Exception):
    """416: the range starts past the object's end (an empty object, for the probe)."""


class Transient(Exception):
    """A failure worth retrying: 5xx, 429, a reset or refused connection, a timeout, a body
    cut short."""


class Unreachable(Transient):
    """A request that got no answer: refused, reset or timed-out connection, a TLS failure."""


class Unexpected(Exception):
    """Any other answer (a 4xx the source has no meaning for...): not retried."""


@dataclass
class Reply:
    """A GET's answer, before its body is read."""

    status: int
    content_range: tuple[int, int, int | None] | None  # (first, last, total) of a 206
    content_length: int | None
    etag: str | None
    #: reads the body into a writable buffer, returns how many bytes (0: the body ended)
    readinto: Callable[[memoryview], int]
    #: after the whole body was read: hands the connection back to the pool
    release: Callable[[], None]
    #: on any failure: drops the connection
    close: Callable[[], None]


class Transport(Protocol):
    url: str

    def get(self, byte_range: str | None, if_match: str | None) -> Reply:
        """GETs the object, ``Range: <byte_range>`` when given, ``If-Match`` when given;
        raises one of this module's exceptions for anything but a 200 or 206."""


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``bytes a-b/total`` as (a, b, total or None); None when absent or malformed."""
    if not value:
        return None
    m = _CONTENT_RANGE.match(value)
    if m is None:
        return None
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), int(m.group(2)), total


def raw_body(response: Any) -> tuple[Callable[[memoryview], int], Callable[[], None]]:
    """(readinto, release) of a urllib3 response: readinto of the ``http.client`` response
    under it when there is one (no temporary copy), else urllib3's own."""
    fp = getattr(response, "_fp", None)
    readinto = fp.readinto if fp is not None and hasattr(fp, "readinto") else response.readinto

    def release() -> None:
        if fp is not None and not fp.isclosed():
            # Bytes left unread: the connection cannot carry another request.
            response.close()
        else:
            response.release_conn()

    return readinto, release
