"""S3 and S3-compatible stores (``s3://bucket/key``) through botocore: signing, the AWS
credential chain (environment, shared files, profiles, SSO, instance and container roles),
``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3`` and regions are botocore's. botocore's own
retries are off: the source retries every request the same way, body included.

An object's GETs skip botocore's per-request work where they can (:class:`_SignedGets`):
botocore resolves the object's URL once and its SigV4 signer signs every GET, which urllib3
sends. Anything unusual in an answer sends that GET, and the object's later ones, through
the botocore client instead."""

from __future__ import annotations

import dataclasses
import os
import threading
import urllib.parse
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


@dataclasses.dataclass
class _Client:
    client: Any
    #: what the client signs with (botocore Credentials; None: anonymous or none found)
    credentials: Any
    #: the signed GETs' urllib3 pool (every object of these options shares it), made on use
    pool: Any = None


_clients: dict[tuple, _Client] = {}
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
    return _client_for(options, connections).client


def _client_for(options: dict[str, Any], connections: int) -> _Client:
    environment = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    key = (tuple(sorted((k, repr(v)) for k, v in options.items())), connections, environment)
    with _clients_lock:
        entry = _clients.get(key)
        if entry is None:
            entry = _clients[key] = _make_client(options, connections)
        return entry


def _make_client(options: dict[str, Any], connections: int) -> _Client:
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
    client = session.create_client(
        "s3",
        endpoint_url=options.get("endpoint_url"),
        region_name=options.get("region_name"),
        aws_access_key_id=options.get("aws_access_key_id"),
        aws_secret_access_key=options.get("aws_secret_access_key"),
        aws_session_token=options.get("aws_session_token"),
        verify=options.get("verify"),
        config=config,
    )
    # The credentials the client signs with, as create_client chose them.
    credentials = None if options.get("anon") else _credentials(options, session)
    return _Client(client, credentials)


class S3Transport:
    """GETs of one S3 object: signed by botocore and sent by urllib3 (:class:`_SignedGets`)
    while the store's answers are ordinary, else by the botocore client."""

    def __init__(self, url: str, options: dict[str, Any], connections: int) -> None:
        self.url = url
        self._bucket, self._key = split_s3_url(url)
        entry = _client_for(options, connections)
        self._client = entry.client
        self._signed = _SignedGets.open(entry, self._bucket, self._key, options, connections)

    def get(self, byte_range: str | None, if_match: str | None) -> Reply:
        signed = self._signed
        if signed is not None:
            try:
                return signed.get(byte_range, if_match)
            except (Changed, RangeNotSatisfiable):
                raise  # 412, 416: the same answer botocore would get
            except Unreachable:
                pass  # no answer: botocore's connection settings (proxies...) may reach it
            except Transient:
                raise  # 5xx, 429: the store is there and busy; the source retries
            except (NotFound, Forbidden, Unexpected):
                pass  # botocore reads S3's error (its code, a region redirect...)
            self._signed = None  # this object's GETs go through botocore from now on
        return self._botocore_get(byte_range, if_match)

    @property
    def signed_get(self) -> dict[str, Any] | None:
        """The signed GETs' URL and signing region (``{"url", "region"}``; region None:
        unsigned, anonymous), while they are in use; no credentials."""
        signed = self._signed
        return None if signed is None else {"url": signed.url, "region": signed.region}

    def _botocore_get(self, byte_range: str | None, if_match: str | None) -> Reply:
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
        """Nothing to do: the client's pools serve every object of the same options."""


#: the query parameters of a SigV2 presigned URL
_QUERY_AUTH = frozenset({"AWSAccessKeyId", "Signature", "Expires"})


def _credentials(options: dict[str, Any], session: Any = None) -> Any:
    """The credentials a client made with `options` signs with: the options' keys, else
    botocore's chain (of `session`, or of a new one for the options' profile); None when
    there are none."""
    import botocore.credentials
    import botocore.session

    if options.get("aws_access_key_id") and options.get("aws_secret_access_key"):
        return botocore.credentials.Credentials(
            options["aws_access_key_id"],
            options["aws_secret_access_key"],
            options.get("aws_session_token"),
        )
    try:
        if session is None:
            if not options.get("profile"):
                # The chain's first link, the environment's keys (botocore's own reader of
                # them), without making a session and the whole chain (0.017 s).
                found = botocore.credentials.EnvProvider().load()
                if found is not None:
                    return found
            session = botocore.session.Session(profile=options.get("profile"))
        return session.get_credentials()
    except Exception:  # botocore raises its own for a broken profile: a client will too
        return None


def _pool_options(options: dict[str, Any]) -> dict[str, Any]:
    """The urllib3 pool settings botocore would use for `options`."""
    verify = options.get("verify")
    if verify is None:
        verify = os.environ.get("AWS_CA_BUNDLE") or True
    return {
        "verify": verify,
        "connect_timeout": options.get("connect_timeout", 10),
        "read_timeout": options.get("read_timeout", 60),
    }


_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY")


def _proxied() -> bool:
    """Whether the environment names a proxy, which botocore honours and urllib3 does not."""
    return any(os.environ.get(v) for v in _PROXY_VARIABLES)


class _SignedGets:
    """One object's GETs without botocore's per-request work (serializing the call, the
    endpoint rules, its event hooks, parsing the answer: 1.7 ms of CPU a GET here, against
    0.6 ms for these), which a checkpoint's hundreds of ranged GETs would pay. botocore still
    does what the protocol needs: the object's URL is the one it resolves (from a presigned
    URL, whose query says the signing region), and each GET is signed by its SigV4 signer
    with the client's credentials, refreshed as botocore refreshes them.

    Not used (None from :meth:`open`) where botocore would send requests differently: a
    proxy in the environment, a signing scheme other than plain SigV4 for ``s3``."""

    def __init__(self, http: Any, credentials: Any, region: str | None) -> None:
        self._http = http
        self._credentials = credentials
        self.region = region
        self.url: str = http.url

    @classmethod
    def without_client(cls, target: dict[str, Any], options: dict[str, Any]) -> _SignedGets | None:
        """The signed GETs of a URL and region a client resolved before (`target`, from
        :attr:`S3Transport.signed_get`), with the credentials botocore's chain (or the
        options) gives now, without making a client (about 0.1 s): a cache validates its
        entry with one such GET. None where a client is needed (see :meth:`open`)."""
        if _proxied():
            return None
        url, region = target.get("url"), target.get("region")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            return None
        if region is None:
            if not options.get("anon"):
                return None
            credentials = None
        elif not isinstance(region, str) or options.get("anon"):
            return None
        else:
            credentials = _credentials(options)
            if credentials is None:
                return None
        from ._http import HTTPTransport

        http = HTTPTransport(url, _pool_options(options), 1, redirect=False)
        return cls(http, credentials, region)

    @classmethod
    def open(
        cls, entry: _Client, bucket: str, key: str, options: dict[str, Any], connections: int
    ) -> _SignedGets | None:
        """The signed GETs of `bucket`/`key` for the client of `entry`; None where they
        would not be sent as the client sends its requests (class docstring)."""
        if _proxied():
            return None
        try:
            presigned = entry.client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=60
            )
        except Exception:  # no credentials, a bad endpoint...: botocore's GET says what
            return None
        parts = urllib.parse.urlsplit(presigned)
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        # The presigned URL's own signature (SigV2 or SigV4 query parameters) is dropped:
        # each GET is signed in its headers, with SigV4 as botocore signs its requests.
        auth = {k: v for k, v in query if k.lower().startswith("x-amz-") or k in _QUERY_AUTH}
        if auth:
            scope = auth.get("X-Amz-Credential", "").split("/")
            if entry.credentials is None or (
                scope != [""] and (len(scope) < 5 or scope[-2:] != ["s3", "aws4_request"])
            ):
                return None
            region = scope[-3] if len(scope) >= 5 else entry.client.meta.region_name
            credentials = entry.credentials
        elif options.get("anon"):
            credentials, region = None, None
        else:
            return None
        rest = urllib.parse.urlencode([(k, v) for k, v in query if k not in auth])
        url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, rest, ""))
        from ._http import HTTPTransport, make_pool

        with _clients_lock:
            if entry.pool is None:
                # Kept-alive connections for every GET in flight: a batch reads up to
                # REMOTE_AT_ONCE objects at once (a directory's shards), each with
                # `connections` GETs; fewer would close one after each GET beyond them.
                from .._reads import REMOTE_AT_ONCE

                entry.pool = make_pool(_pool_options(options), connections * REMOTE_AT_ONCE)
        # A redirect is S3 naming the bucket's region: botocore follows it.
        http = HTTPTransport(url, {}, connections, redirect=False, pool=entry.pool)
        return cls(http, credentials, region)

    def get(self, byte_range: str | None, if_match: str | None) -> Reply:
        headers = {"Accept-Encoding": "identity"}
        if byte_range is not None:
            headers["Range"] = byte_range
        if if_match is not None:
            headers["If-Match"] = if_match
        if self._credentials is not None:
            from botocore.auth import S3SigV4Auth
            from botocore.awsrequest import AWSRequest

            request = AWSRequest(method="GET", url=self._http.url, headers=headers)
            frozen = self._credentials.get_frozen_credentials()
            S3SigV4Auth(frozen, "s3", self.region).add_auth(request)
            headers = dict(request.headers.items())
        return self._http.send(headers)

    def close(self) -> None:
        """Closes the connections of a pool of its own (:meth:`without_client`)."""
        self._http.close()


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
    from ._source import connections

    # The reads' pool size: the shards' reads then share this client (made once: 0.1 s).
    client = client_for(options, connections())
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
