"""A real S3 endpoint for tests: moto_server on 127.0.0.1, reached through s3fs like any bucket."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
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


def upload_models(models: Path, bucket: str, storage_options: dict) -> None:
    """The test target and draft under s3://{bucket}/models/target/ and .../draft/, as a user uploads them."""
    fs = s3fs.S3FileSystem(**storage_options)
    for name in ("target", "draft"):
        fs.put(str(models / name) + "/", f"{bucket}/models/{name}/", recursive=True)
