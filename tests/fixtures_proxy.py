"""A fault-injecting TCP proxy in front of the moto S3 server, and endpoints that refuse or never answer.

The proxy relays HTTP/1.1 byte for byte (it reads just enough of each request and response to know where they
end), one request per connection (it answers `Connection: close`, so every request opens a new one), and
injects what object storage does to long jobs:
  - on a `fault_rate` fraction of connections, one fault: the connection reset before the reply, the reply
    cut half way through its body (then reset), or the reply delayed by `delay_s`;
  - an outage of one object: every request whose path holds a given key is answered 503 ServiceUnavailable,
    for its next N requests or until `heal()`;
  - a slow drip on one object: every response for it sends its head at once and its body at a few bytes/s,
    until `heal()`;
  - a burst of resets on one kind of request: the next N requests of a method whose target (path and query)
    holds a given fragment are reset before any reply.
Each injected fault is counted in `injected`, so a test can show the faults really happened.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator

import pytest
import s3fs

FAULTS = ("reset", "cut", "delay")
_OUTAGE_BODY = b"<Error><Code>ServiceUnavailable</Code><Message>Please try again.</Message></Error>"


class FaultProxy:
    def __init__(self, upstream: tuple[str, int], seed: int = 1):
        self.upstream = upstream
        self.fault_rate = 0.0
        self.delay_s = 0.5
        self.injected: Counter[str] = Counter()
        self._outages: dict[str, int | None] = {}  # path fragment -> requests still to fail (None: until healed)
        self._drips: dict[str, float] = {}  # path fragment -> body bytes per second
        self._resets: dict[tuple[str, str], int | None] = {}  # (method, target fragment) -> resets still to make
        self.requests: list[tuple[float, str, str]] = []  # (time.time(), method, path) of every request
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def outage(self, key: str, requests: int | None = None) -> None:
        """Fail every request for `key` (a path fragment such as "bucket/in/00001.tar"): the next `requests`
        of them, or all until heal()."""
        with self._lock:
            self._outages[urllib.parse.quote(key)] = requests

    def drip(self, key: str, bytes_per_s: float) -> None:
        """Send the body of every response for `key` (a path fragment) at `bytes_per_s`, until heal()."""
        with self._lock:
            self._drips[urllib.parse.quote(key)] = bytes_per_s

    def resets(self, method: str, fragment: str, requests: int | None = None) -> None:
        """Reset the connection of the next `requests` requests (or all, until heal()) whose method is `method` and
        whose target holds `fragment` (its path and query, unquoted: "?delete" for DeleteObjects, "?list-type=2"
        for a listing), before any reply: a store that drops connections for a moment."""
        with self._lock:
            self._resets[(method, fragment)] = requests

    def heal(self) -> None:
        with self._lock:
            self._outages.clear()
            self._drips.clear()
            self._resets.clear()

    def close(self) -> None:
        self._closed = True
        self._server.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                fault = self._random.choice(FAULTS) if self._random.random() < self.fault_rate else None
            threading.Thread(target=self._serve, args=(client, fault), daemon=True).start()

    def _in_outage(self, target: str) -> bool:
        path = target.split("?", 1)[0]
        with self._lock:
            for key, left in self._outages.items():
                if key in path:
                    if left is not None:
                        if left == 0:
                            continue
                        self._outages[key] = left - 1
                    self.injected["outage"] += 1
                    return True
        return False

    def _in_reset_burst(self, method: str, target: str) -> bool:
        with self._lock:
            for (wanted, fragment), left in self._resets.items():
                if wanted == method and fragment in target and left != 0:
                    if left is not None:
                        self._resets[(wanted, fragment)] = left - 1
                    self.injected["reset_burst"] += 1
                    return True
        return False

    def _drip_rate(self, target: str) -> float | None:
        path = target.split("?", 1)[0]
        with self._lock:
            return next((rate for key, rate in self._drips.items() if key in path), None)

    def _serve(self, client: socket.socket, fault: str | None) -> None:
        reader = client.makefile("rb")
        try:
            # A client that sends `Expect: 100-continue` (botocore does for uploads) waits for the go-ahead before
            # its body: the proxy gives it, and the upstream gets the request without the header.
            request = _read_message(
                reader, request=True, go_ahead=lambda: client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            )
            if request is None:
                return
            method, target = request[0].split(b" ", 2)[:2]
            with self._lock:
                self.requests.append((time.time(), method.decode(), urllib.parse.unquote(target.decode())))
            if self._in_outage(target.decode()):
                body = b"" if method == b"HEAD" else _OUTAGE_BODY
                head = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
                client.sendall(f"{head}Content-Length: {len(_OUTAGE_BODY)}\r\n\r\n".encode() + body)
                return
            if fault == "reset":
                self._count(fault)
                return _reset(client)
            if self._in_reset_burst(method.decode(), urllib.parse.unquote(target.decode())):
                return _reset(client)
            response_head, response_body = self._forward(b"".join(request), method)
            response_head = _closing(response_head)
            if fault == "delay":
                self._count(fault)
                time.sleep(self.delay_s)
            rate = self._drip_rate(target.decode())
            if rate is not None and response_body:
                self._count("drip")
                client.sendall(response_head)
                for byte in response_body:  # until the client gives up and closes (OSError) or all is sent
                    client.sendall(bytes([byte]))
                    time.sleep(1 / rate)
                return
            if fault == "cut" and len(response_body) > 1:
                self._count(fault)
                client.sendall(response_head + response_body[: len(response_body) // 2])
                return _reset(client)
            client.sendall(response_head + response_body)
        except OSError:
            return
        finally:
            reader.close()
            client.close()

    def _count(self, fault: str) -> None:
        with self._lock:
            self.injected[fault] += 1

    def _forward(self, raw_request: bytes, method: bytes) -> tuple[bytes, bytes]:
        # One upstream connection per request: the response ends where its framing says, or at the close.
        with socket.create_connection(self.upstream, timeout=30) as upstream:
            upstream.sendall(raw_request)
            with upstream.makefile("rb") as reader:
                response = _read_message(reader, request=False, head_only=method == b"HEAD")
        if response is None:
            raise OSError("upstream closed without a response")
        return response


def _closing(head: bytes) -> bytes:
    """The response head with `Connection: close`, so the client opens a new connection for its next request."""
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
    return b"\r\n".join(lines[:-2] + [b"Connection: close", b"", b""])


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (RST), as a dropped connection looks to the client."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _read_message(reader, *, request: bool, head_only: bool = False, go_ahead=None) -> tuple[bytes, bytes] | None:
    """(head, body) of the next HTTP/1.1 message, body bytes as sent (chunked stays chunked); None at EOF."""
    lines = []
    while True:
        line = reader.readline()
        if not line:
            return None if not lines else (b"".join(lines), b"")
        lines.append(line)
        if line in (b"\r\n", b"\n") and len(lines) > 1:
            break
    headers = {}
    for line in lines[1:-1]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if request and headers.get("expect", "").lower() == "100-continue":
        lines = [line for line in lines if not line.lower().startswith(b"expect:")]
        go_ahead()
    head = b"".join(lines)
    status = b"" if request else lines[0].split(b" ", 2)[1]
    if head_only or status in (b"204", b"304") or status.startswith(b"1"):
        return head, b""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return head, _read_chunked(reader)
    if "content-length" in headers:
        return head, reader.read(int(headers["content-length"]))
    return head, b"" if request else reader.read()  # a response without framing ends at the close


def _read_chunked(reader) -> bytes:
    raw = []
    while True:
        size_line = reader.readline()
        raw.append(size_line)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            while True:  # trailers, up to the empty line
                line = reader.readline()
                raw.append(line)
                if line in (b"\r\n", b"\n", b""):
                    return b"".join(raw)
        raw.append(reader.read(size + 2))  # the chunk and its CRLF


@pytest.fixture
def fault_proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the session's moto server; configure it per test (fault_rate, outage)."""
    upstream = urllib.parse.urlparse(s3_endpoint)
    proxy = FaultProxy((upstream.hostname, upstream.port))
    s3fs.S3FileSystem.clear_instance_cache()
    yield proxy
    proxy.close()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """An endpoint that accepts connections and never answers a byte."""
    server = socket.create_server(("127.0.0.1", 0))
    held = []

    def accept():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for sock in held:
        sock.close()


@pytest.fixture
def refusing_endpoint() -> str:
    """An endpoint where nothing listens: every connection is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"
