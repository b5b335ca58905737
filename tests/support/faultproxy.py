"""A fault-injecting HTTP proxy for S3 tests: put it between the client and moto's server.

Each request is read whole (``Expect: 100-continue`` is answered here), then either forwarded to
the upstream server on a fresh connection (and the response relayed), or answered with a fault
chosen by ``proxy.plan(request)``:

* ``"503"``     an S3 ``ServiceUnavailable`` error response (transient);
* ``"slowdown"``an S3 ``SlowDown`` (HTTP 503) throttling response (transient);
* ``"reset"``   the connection is reset (TCP RST) instead of answered (transient);
* ``"stall"``   no answer until the client gives up (its read timeout; transient);
* ``"drop"``    forwarded, so the server acts on it, but the response is lost (reset);
* ``"403"``     an ``AccessDenied`` response (permanent);
* ``"badkey"``  an ``InvalidAccessKeyId`` response (permanent: wrong credentials);
* ``"nosuchupload"`` a ``NoSuchUpload`` response (what S3 may answer to a repeated completion);
* ``None``      forwarded untouched.

``proxy.injected`` counts the faults injected per kind, ``proxy.requests`` what was asked, and
``proxy.max_in_flight`` the most requests of one kind handled at once.
"""

from __future__ import annotations

import random
import socket
import socketserver
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

FAULTS = ("503", "slowdown", "reset", "stall", "drop", "403", "badkey", "nosuchupload")

_ERRORS = {
    "503": (503, "Service Unavailable", "ServiceUnavailable", "Please reduce your request rate."),
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "403": (403, "Forbidden", "AccessDenied", "Access Denied"),
    "badkey": (403, "Forbidden", "InvalidAccessKeyId",
               "The AWS Access Key Id you provided does not exist in our records."),
    "nosuchupload": (404, "Not Found", "NoSuchUpload", "The specified upload does not exist."),
}


@dataclass
class Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes = field(repr=False)

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query, keep_blank_values=True)

    @property
    def operation(self) -> str:
        """The S3 operation, roughly: enough to aim faults at one kind of request."""
        q = self.query
        if self.method == "PUT" and "partNumber" in q:
            return "UploadPart"
        if self.method == "POST" and "uploads" in q:
            return "CreateMultipartUpload"
        if self.method == "POST" and "uploadId" in q:
            return "CompleteMultipartUpload"
        if self.method == "DELETE" and "uploadId" in q:
            return "AbortMultipartUpload"
        if self.method == "GET" and "uploads" in q:
            return "ListMultipartUploads"
        if self.method == "GET" and ("list-type" in q or self.path.count("/") <= 1):
            return "ListObjects"
        return {"PUT": "PutObject", "GET": "GetObject", "HEAD": "HeadObject",
                "DELETE": "DeleteObject"}.get(self.method, self.method)


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(1 << 16)
        if not data:
            return False
        self.buf += data
        return True

    def line(self) -> bytes | None:
        while b"\r\n" not in self.buf:
            if not self._fill():
                return None
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError("client closed mid-body")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data


def _read_request(reader: _Reader, sock: socket.socket) -> Request | None:
    first = reader.line()
    if not first:
        return None
    method, target, _ = first.decode("latin-1").split(" ", 2)
    headers: list[tuple[str, str]] = []
    while True:
        line = reader.line()
        if line is None:
            return None
        if not line:
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    lower = {k.lower(): v for k, v in headers}
    if lower.get("expect", "").lower() == "100-continue":
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        headers = [(k, v) for k, v in headers if k.lower() != "expect"]
    if "chunked" in lower.get("transfer-encoding", "").lower():
        body = b""
        while True:  # keep the chunked framing: the body is relayed as it came
            size_line = reader.line() or b""
            body += size_line + b"\r\n"
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while (trailer := reader.line()) not in (None, b""):
                    body += trailer + b"\r\n"
                body += b"\r\n"
                break
            body += reader.exactly(size + 2)
    else:
        body = reader.exactly(int(lower.get("content-length", "0")))
    return Request(method, target, headers, body)


def _error_response(kind: str, method: str) -> bytes:
    status, reason, code, message = _ERRORS[kind]
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><RequestId>fault</RequestId></Error>").encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head if method == "HEAD" else head + body  # HEAD answers carry no body


def _closing(response: bytes) -> bytes:
    """The response with ``Connection: close``: the client must not reuse this connection."""
    head, sep, body = response.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    lines = [h for h in lines if not h.lower().startswith(b"connection:")]
    return b"\r\n".join([status, *lines, b"Connection: close"]) + sep + body


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class FaultProxy:
    """A threaded HTTP/1.1 proxy in front of ``upstream`` (host, port) on 127.0.0.1.

    Attributes:
        plan: callable(request) -> a fault kind from FAULTS, or None to forward. Set it (or use
            :meth:`fail_share` / :meth:`fail_next`) while the proxy runs; called under a lock.
        injected: faults injected so far, per kind.
        requests: requests seen so far, per S3 operation.
        max_in_flight: the most requests of one operation handled at the same time.
        forwarded(op) / arrived(op): ``threading.Event`` set once a request of operation ``op``
            was forwarded and answered / has arrived (tests wait on them instead of sleeping).
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.plan: Callable[[Request], str | None] = lambda request: None
        self.injected: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        self._in_flight: Counter[str] = Counter()
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="faultproxy")

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    # -- plans -----------------------------------------------------------------------------------
    def reset_plan(self) -> None:
        """Forward everything from now on and forget the counters."""
        with self._lock:
            self.plan = lambda request: None
            self.injected.clear()
            self.requests.clear()
            self.max_in_flight.clear()

    def fail_share(self, shares: dict[str, float], *, seed: int = 0,
                   operations: Iterable[str] | None = None) -> None:
        """Inject each fault kind into that share of requests (of ``operations``, or all)."""
        rng = random.Random(seed)
        only = None if operations is None else frozenset(operations)

        def plan(request: Request) -> str | None:
            if only is not None and request.operation not in only:
                return None
            draw = rng.random()
            for kind, share in shares.items():
                if draw < share:
                    return kind
                draw -= share
            return None

        self.plan = plan

    def fail_next(self, kind: str, count: int = 1, *,
                  operations: Iterable[str] | None = None,
                  key_suffix: str | None = None) -> None:
        """Inject ``kind`` into the next ``count`` requests (of ``operations``, or any; to keys
        ending in ``key_suffix``, or any)."""
        left = [count]
        only = None if operations is None else frozenset(operations)

        def plan(request: Request) -> str | None:
            if left[0] <= 0 or (only is not None and request.operation not in only):
                return None
            if key_suffix is not None and not request.path.endswith(key_suffix):
                return None
            left[0] -= 1
            return kind

        self.plan = plan

    def forwarded(self, operation: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault(operation, threading.Event())

    def arrived(self, operation: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault(f"arrived:{operation}", threading.Event())

    # -- serving ---------------------------------------------------------------------------------
    def _serve(self, sock: socket.socket) -> None:
        reader = _Reader(sock)
        try:
            while not self._stopping.is_set():
                request = _read_request(reader, sock)
                if request is None:
                    return
                op = request.operation
                with self._lock:
                    fault = self.plan(request)
                    self.requests[op] += 1
                    if fault is not None:
                        if fault not in FAULTS:
                            raise ValueError(f"unknown fault {fault!r}")
                        self.injected[fault] += 1
                    arrived = self._events.setdefault(f"arrived:{op}", threading.Event())
                arrived.set()
                if fault in _ERRORS:
                    sock.sendall(_error_response(fault, request.method))
                    continue
                if fault == "reset":
                    _reset(sock)
                    return
                if fault == "stall":
                    self._stall(sock)
                    return
                response = self._forward(request, op)
                if fault == "drop":
                    _reset(sock)
                    return
                sock.sendall(response)
                return  # the relayed response says Connection: close
        except OSError:
            return
        finally:
            try:
                sock.close()
            except OSError:
                pass

    def _stall(self, sock: socket.socket) -> None:
        """Answer nothing until the client closes the connection (or the proxy stops)."""
        sock.settimeout(0.05)
        while not self._stopping.is_set():
            try:
                if not sock.recv(1 << 16):
                    return
            except TimeoutError:
                continue
            except OSError:
                return

    def _forward(self, request: Request, op: str) -> bytes:
        with self._lock:
            self._in_flight[op] += 1
            self.max_in_flight[op] = max(self.max_in_flight[op], self._in_flight[op])
        try:
            headers = [(k, v) for k, v in request.headers
                       if k.lower() not in ("connection", "keep-alive")]
            head = f"{request.method} {request.target} HTTP/1.1\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in headers)
            head += "Connection: close\r\n\r\n"
            with socket.create_connection(self.upstream) as up:
                up.sendall(head.encode("latin-1") + request.body)
                chunks = []
                while data := up.recv(1 << 16):
                    chunks.append(data)
            return _closing(b"".join(chunks))
        finally:
            with self._lock:
                self._in_flight[op] -= 1
                event = self._events.setdefault(op, threading.Event())
            event.set()
