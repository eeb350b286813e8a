"""S3 and S3-compatible stores (``s3://bucket/key``) through botocore: signing, the AWS
credential chain (environment, shared files, profiles, SSO, instance and container roles),
``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3`` and regions are botocore's. botocore's own
retries are off: the source retries every request the same way, body included."""

from __future__ import annotations

import os
import threading
from typing import Any

from ._transport import (
    Changed,
    Forbidden,
    NotFound,
    RangeNotSatisfiable,
    Reply,
    Transient,
    Unexpected,
    parse_content_range,
    raw_body,
)

__all__ = ["S3Transport", "call", "list_names", "split_s3_url"]

#: storage_options an S3 source takes (all optional); anything else is refused by name.
OPTIONS = frozenset(
    {
        "endpoint_url",
        "region_name",
        "anon",
        "profile",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "addressing_style",
        "connect_timeout",
        "read_timeout",
        "verify",
    }
)

_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def split_s3_url(url: str) -> tuple[str, str]:
    """(bucket, key) of ``s3://bucket/key``; ValueError if either is missing."""
    rest = url[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise ValueError(f"{url}: an S3 URL names a bucket and a key: s3://bucket/key")
    return bucket, key


def client_for(options: dict[str, Any], connections: int) -> Any:
    """A botocore S3 client for `options`, made once per process, set of options and AWS
    environment (making one loads botocore's service model: about 0.1 s). The ``AWS_*``
    variables are part of the key: a client resolves the endpoint, region and credentials
    they name when it is made, so one made before they changed would still use the old."""
    environment = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    key = (tuple(sorted((k, repr(v)) for k, v in options.items())), connections, environment)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = _make_client(options, connections)
        return client


def _make_client(options: dict[str, Any], connections: int) -> Any:
    try:
        import botocore.config
        import botocore.session
        from botocore import UNSIGNED
    except ImportError as e:
        raise ImportError("reading s3:// URLs needs botocore: pip install 'ckptio[s3]'") from e
    session = botocore.session.Session(profile=options.get("profile"))
    config = botocore.config.Config(
        signature_version=UNSIGNED if options.get("anon") else None,
        max_pool_connections=max(1, connections),
        retries={"total_max_attempts": 1},
        connect_timeout=float(options.get("connect_timeout", 10)),
        read_timeout=float(options.get("read_timeout", 60)),
        s3={"addressing_style": options.get("addressing_style", "auto")},
        response_checksum_validation="when_required",
    )
    return session.create_client(
        "s3",
        endpoint_url=options.get("endpoint_url"),
        region_name=options.get("region_name"),
        aws_access_key_id=options.get("aws_access_key_id"),
        aws_secret_access_key=options.get("aws_secret_access_key"),
        aws_session_token=options.get("aws_session_token"),
        verify=options.get("verify"),
        config=config,
    )


class S3Transport:
    """GETs of one S3 object."""

    def __init__(self, url: str, options: dict[str, Any], connections: int) -> None:
        self.url = url
        self._bucket, self._key = split_s3_url(url)
        self._client = client_for(options, connections)

    def get(self, byte_range: str | None, if_match: str | None) -> Reply:
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Key": self._key}
        if byte_range is not None:
            kwargs["Range"] = byte_range
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        response = call(self._client.get_object, **kwargs)
        meta = response.get("ResponseMetadata", {})
        body = response["Body"]
        raw = getattr(body, "_raw_stream", None)
        if raw is not None:
            readinto, release = raw_body(raw)
            close = raw.close
        else:  # pragma: no cover - botocore always has a urllib3 response under its body
            readinto, release, close = body.readinto, body.close, body.close
        return Reply(
            status=int(meta.get("HTTPStatusCode", 200)),
            content_range=parse_content_range(response.get("ContentRange")),
            content_length=response.get("ContentLength"),
            etag=response.get("ETag"),
            readinto=readinto,
            release=release,
            close=close,
        )

    def close(self) -> None:
        """Nothing to do: the client and its connection pool serve every source."""


def call(method: Any, **kwargs: Any) -> Any:
    """``method(**kwargs)`` (a botocore client's operation), its failures raised as
    ``_transport``'s kinds (NotFound, Forbidden, Transient...)."""
    import botocore.exceptions as errors

    try:
        return method(**kwargs)
    except errors.ClientError as e:
        _raise_for(e)
    except errors.NoCredentialsError as e:
        raise Forbidden(
            f"{e} (set AWS credentials, or storage_options={{'anon': True}} for a public bucket)"
        ) from e
    except (errors.BotoCoreError, OSError) as e:
        raise Transient(f"{type(e).__name__}: {e}") from e


def list_names(url: str, options: dict[str, Any], attempts: int, backoff: float) -> list[str]:
    """The names of the objects directly under the prefix `url` (``s3://bucket/dir/``),
    relative to it, in key order (ListObjectsV2, page by page, each retried)."""
    from ._source import retrying

    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"{url}: an S3 directory URL names a bucket: s3://bucket/dir/")
    client = client_for(options, 2)
    names: list[str] = []
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/"}
    while True:
        page = retrying(
            url,
            "listing the directory",
            lambda: call(client.list_objects_v2, **kwargs),
            attempts,
            backoff,
        )
        names += [item["Key"][len(prefix) :] for item in page.get("Contents", ())]
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return names
        kwargs["ContinuationToken"] = token


def _raise_for(error: Any) -> None:
    info = error.response.get("Error", {})
    code = str(info.get("Code", ""))
    status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    what = f"{code or 'error'} (HTTP {status}): {info.get('Message') or ''}".rstrip(": ")
    if status == 404 or code in ("NoSuchKey", "NoSuchBucket", "404"):
        raise NotFound(what) from error
    if status in (401, 403) or code in (
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
    ):
        raise Forbidden(what) from error
    if status == 412 or code == "PreconditionFailed":
        raise Changed(what) from error
    if status == 416 or code == "InvalidRange":
        raise RangeNotSatisfiable(what) from error
    if (
        status == 429
        or status >= 500
        or code in ("SlowDown", "InternalError", "ServiceUnavailable")
    ):
        raise Transient(what) from error
    raise Unexpected(what) from error
