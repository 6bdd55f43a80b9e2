"""A real S3 endpoint for tests: moto_server on 127.0.0.1, reached through s3fs like any bucket."""

from __future__ import annotations

import http.client
import itertools
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import s3fs

_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with code {proc.returncode}:\n{log.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not answer on {url} within {timeout_s} s:\n{log.read_text()}")


@pytest.fixture(scope="session")
def s3_request_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's moto server log: one line per request ("GET /bucket/key HTTP/1.1" 200 -)."""
    return tmp_path_factory.mktemp("moto") / "moto_server.log"


@pytest.fixture(scope="session")
def s3_endpoint(s3_request_log: Path) -> Iterator[str]:
    """URL of a moto S3 server running for the whole session, with fake credentials in the environment."""
    moto_server = Path(sys.executable).parent / "moto_server"
    if not moto_server.exists():
        raise RuntimeError(f"{moto_server} not found; install the dev extras (moto[server])")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = s3_request_log
    with pytest.MonkeyPatch.context() as env, log.open("w") as log_file:
        for name, value in _CREDENTIALS.items():
            env.setenv(name, value)
        # A proxy from the developer's environment must not swallow requests to the local server.
        env.setenv("NO_PROXY", "127.0.0.1,localhost")
        env.setenv("no_proxy", "127.0.0.1,localhost")
        proc = subprocess.Popen(
            [str(moto_server), "-H", "127.0.0.1", "-p", str(port)], stdout=log_file, stderr=subprocess.STDOUT
        )
        try:
            _wait_until_up(url, proc, log)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> Iterator[tuple[str, dict]]:
    """A new empty bucket and the storage_options a user's config would hold to reach it."""
    storage_options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    # s3fs reuses one instance per set of arguments, with its directory listings cached;
    # every test starts and ends without them so no listing leaks from one test to the next.
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(**storage_options)
    fs.mkdir(bucket)
    fs.invalidate_cache()
    yield bucket, storage_options
    s3fs.S3FileSystem.clear_instance_cache()


class _FlakyHandler(BaseHTTPRequestHandler):
    """Forwards to moto, but answers every `every`-th request with 503 SlowDown (S3's throttling reply)."""

    protocol_version = "HTTP/1.1"
    upstream: tuple[str, int]
    every: int
    counter = itertools.count(1)
    failed = 0

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b""
        while True:  # HTTP/1.1 chunked request body (botocore streams uploads this way)
            size = int(self.rfile.readline().split(b";")[0], 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return body
            body += self.rfile.read(size)
            self.rfile.readline()

    def _handle(self):
        body = self._read_body()
        if next(self.counter) % self.every == 0:
            type(self).failed += 1
            payload = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":  # a HEAD reply has no body, or the connection's next reply is garbled
                self.wfile.write(payload)
            return
        connection = http.client.HTTPConnection(*self.upstream, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "transfer-encoding")}
        connection.request(self.command, self.path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                self.send_header(name, value)
        # A HEAD reply carries the object's length, not its (empty) body's.
        length = response.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        connection.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky_s3_endpoint(s3_endpoint: str) -> Iterator[tuple[str, type]]:
    """An S3 endpoint in front of moto that throttles every third request; yields (url, handler class)."""
    upstream = urllib.parse.urlparse(s3_endpoint)
    handler = type(
        "Flaky",
        (_FlakyHandler,),
        {"upstream": (upstream.hostname, upstream.port), "every": 3, "counter": itertools.count(1), "failed": 0},
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        s3fs.S3FileSystem.clear_instance_cache()
