"""Fault classification, retries with a time budget, and the bounded-wait settings object storage is opened with."""

import errno
import http.client
import tarfile
import threading
import time

import aiohttp
import pytest
import s3fs
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from s3fs.errors import translate_boto_error

from specvlm.data.retry import RetryPolicy, describe, filesystem, is_transient, with_request_deadline, with_retries


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Get"
    )


TRANSIENT = {
    "refused endpoint": EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
    "connect timeout": ConnectTimeoutError(endpoint_url="http://x"),
    "read timeout": ReadTimeoutError(endpoint_url="http://x"),
    "connection closed": ConnectionClosedError(endpoint_url="http://x"),
    "stream cut": ResponseStreamingError(error="connection broken"),
    "short body": IncompleteReadError(actual_bytes=1, expected_bytes=2),
    "throttled": _client_error("SlowDown", 503),
    "unavailable": _client_error("ServiceUnavailable", 503),
    "internal error": _client_error("InternalError", 500),
    "bad gateway": _client_error("BadGateway", 502),
    "request timeout": _client_error("RequestTimeout", 400),
    "s3fs-wrapped throttling": translate_boto_error(_client_error("SlowDown", 503)),
    "s3fs-wrapped 500": translate_boto_error(_client_error("InternalError", 500)),
    "aiohttp cut body": aiohttp.ClientPayloadError("Response payload is not completed"),
    "aiohttp disconnect": aiohttp.ServerDisconnectedError(),
    "connection reset": ConnectionResetError(errno.ECONNRESET, "reset by peer"),
    "socket timeout": TimeoutError("timed out"),
    "http short read": http.client.IncompleteRead(b"partial"),
}
PERMANENT = {
    "missing object": _client_error("NoSuchKey", 404),
    "access denied": _client_error("AccessDenied", 403),
    "s3fs-wrapped missing object": translate_boto_error(_client_error("NoSuchKey", 404)),
    "s3fs-wrapped access denied": translate_boto_error(_client_error("AccessDenied", 403)),
    "no credentials": NoCredentialsError(),
    "missing file": FileNotFoundError(errno.ENOENT, "no such file"),
    "truncated tar": tarfile.ReadError("unexpected end of data"),
    "a bug": ValueError("not a storage problem"),
}


@pytest.mark.parametrize("name", TRANSIENT)
def test_transient_faults_are_retried(name):
    assert is_transient(TRANSIENT[name])


@pytest.mark.parametrize("name", PERMANENT)
def test_permanent_faults_are_not_retried(name):
    assert not is_transient(PERMANENT[name])


def test_a_wrapped_permanent_error_stays_permanent_whatever_its_cause():
    wrapper = FileNotFoundError("gone")
    wrapper.__cause__ = ConnectionResetError()
    assert not is_transient(wrapper)


def _failing(times: int, error: Exception):
    calls = []

    def call():
        calls.append(1)
        if len(calls) <= times:
            raise error
        return len(calls)

    return call, calls


def test_with_retries_outlasts_transient_faults_within_its_budget():
    call, calls = _failing(4, ConnectionResetError())
    assert with_retries(call, RetryPolicy(budget_s=30, base_s=0.001)) == 5 and len(calls) == 5


def test_with_retries_gives_up_when_the_budget_is_spent():
    call, calls = _failing(10**6, ConnectionResetError())
    with pytest.raises(ConnectionResetError):
        with_retries(call, RetryPolicy(budget_s=0.05, base_s=0.001, cap_s=0.01))
    assert 1 < len(calls) < 10**6


def test_with_retries_raises_a_permanent_error_at_once():
    call, calls = _failing(1, FileNotFoundError())
    with pytest.raises(FileNotFoundError):
        with_retries(call, RetryPolicy(budget_s=30))
    assert len(calls) == 1


def test_s3_is_opened_with_bounded_waits_and_one_retry_layer_per_level():
    fs, _ = filesystem("s3://bucket/x", {"endpoint_url": "http://127.0.0.1:9"})
    assert isinstance(fs, s3fs.S3FileSystem) and fs.retries == 1
    assert fs.config_kwargs["retries"]["mode"] == "standard"
    quick, _ = filesystem("s3://bucket/x", {"endpoint_url": "http://127.0.0.1:9"}, preflight=True)
    assert quick.config_kwargs["read_timeout"] < fs.config_kwargs["read_timeout"]
    # A user's own botocore settings win over the defaults.
    own, _ = filesystem("s3://bucket/x", {"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"read_timeout": 99}})
    assert own.config_kwargs["read_timeout"] == 99 and own.config_kwargs["connect_timeout"] == 5


def test_a_write_to_a_store_that_stops_answering_times_out_instead_of_hanging(silent_endpoint):
    fs, root = filesystem(
        "s3://bucket/data", {"endpoint_url": silent_endpoint, "key": "k", "secret": "s"}, preflight=True
    )
    outcome = []

    def write():
        try:
            fs.pipe_file(f"{root}/x", b"payload")
        except Exception as exc:
            outcome.append(exc)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    writer.join(timeout=120)  # a guard against a hang, not a speed limit: it ends after its read timeouts
    assert outcome and is_transient(outcome[0]), "the write waited without a bound"


def test_a_response_that_drips_is_cut_at_the_request_deadline_and_counts_as_transient(s3_bucket, fault_proxy):
    bucket, options = s3_bucket
    s3fs.S3FileSystem(**options).pipe_file(f"{bucket}/slow.bin", b"x" * 4096)
    fault_proxy.drip(f"{bucket}/slow.bin", bytes_per_s=20)  # a byte every 50 ms: never a 15 s gap between bytes
    through_proxy = {**options, "endpoint_url": fault_proxy.url}
    fs, path = filesystem(f"s3://{bucket}/slow.bin", with_request_deadline(f"s3://{bucket}", through_proxy, 2.0))
    start = time.monotonic()
    with pytest.raises(Exception) as caught:
        fs.cat_file(path)
    # 4 KiB at 20 B/s would take 205 s; botocore's standard mode may try the request up to 3 times.
    assert time.monotonic() - start < 3 * 2.0 + 5
    assert fault_proxy.injected["drip"] >= 1 and is_transient(caught.value)
    with pytest.raises(Exception) as caught, fs.open(path, "rb") as f:
        f.read()  # a ranged read, as the shard readers make: s3fs loses the timeout in an IndexError
    assert is_transient(caught.value) and "Read timeout" in describe(caught.value)
    fault_proxy.heal()
    assert fs.cat_file(path) == b"x" * 4096  # the same options read a healthy response whole
