"""Object-storage faults, told apart in one place, and the timeouts and retries built on that.

Three layers could retry a failed read or write; each does only what it alone can:
  - botocore, per HTTP request, in its *standard* retry mode: connection errors, timeouts, 5xx replies and
    throttling, a few attempts with exponential backoff and jitter;
  - `with_retries` and the shard readers here, per operation (a listing, a whole-file write, a shard stream): a
    fault that outlasts botocore's attempts, or a response body cut half way (botocore has handed the response
    over by then, so only the reader can ask again), with backoff and jitter until a time budget is spent;
  - s3fs's own retry loop is switched off: stacked on the other two it multiplies every wait, which is how one
    endpoint that never answers kept a job silent for minutes.
Connect and read timeouts bound every request's waits, and a total deadline bounds each S3 request, its body
included: a response whose bytes arrive just often enough to beat the read timeout (a slow drip) would otherwise
hold a read forever. Its time counts against the caller's retry budget like any other failed attempt.
"""

from __future__ import annotations

import errno
import functools
import http.client
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TypeVar

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs

T = TypeVar("T")

# Errors that say the object is wrong, not the connection: retrying cannot help.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
# OS-level codes of a connection or a server that may recover (s3fs maps 503 SlowDown to EBUSY, 500 to EREMOTEIO).
_TRANSIENT_ERRNOS = frozenset(
    {errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE, errno.EAGAIN, errno.EBUSY}
    | {getattr(errno, "EREMOTEIO", 121)}
)

# botocore settings per request. The job's reads can afford patience (a slow first byte is not a dead store);
# preflight only asks whether the store answers at all, and must say so within seconds.
S3_REQUEST_SETTINGS = {
    "connect_timeout": 5,
    "read_timeout": 15,
    "retries": {"mode": "standard", "total_max_attempts": 3},
}
S3_PREFLIGHT_SETTINGS = {
    "connect_timeout": 3,
    "read_timeout": 4,
    "retries": {"mode": "standard", "total_max_attempts": 2},
}


# The most one S3 request may take, reply body included, unless the caller says otherwise (input.request_deadline_s
# for a job's reads). 300 s passes a 50 MiB block (s3fs's default) at 170 KiB/s; a drip far slower is cut.
REQUEST_DEADLINE_S = 300.0
PREFLIGHT_DEADLINE_S = 10.0


@functools.cache
def _deadline_session_class():
    # aiobotocore gives its aiohttp session only connect and read (between bytes) timeouts; aiohttp's own `total`
    # timeout bounds a whole request, body reads included, and AioConfig's public `http_session_cls` option lets
    # a session class pass it.
    import aiohttp
    from aiobotocore.httpsession import AIOHTTPSession

    class DeadlineSession(AIOHTTPSession):
        def __init__(self, *args, deadline_s: float, **kwargs):
            super().__init__(*args, **kwargs)
            self.deadline_s = deadline_s

        def _get_request_timeout(self, request):
            timeout = super()._get_request_timeout(request) or self._timeout
            return aiohttp.ClientTimeout(
                sock_connect=timeout.sock_connect, sock_read=timeout.sock_read, total=self.deadline_s
            )

    return DeadlineSession


@functools.cache
def deadline_session(deadline_s: float):
    """An aiobotocore `http_session_cls` (AioConfig option) whose every request ends within deadline_s seconds,
    or fails with a timeout, which is_transient() retries. Cached, so that equal settings give equal options
    (s3fs reuses a filesystem per options)."""
    return functools.partial(_deadline_session_class(), deadline_s=deadline_s)


def with_request_deadline(uri: str, storage_options: dict, deadline_s: float) -> dict:
    """`storage_options` for `uri` whose S3 requests each end within deadline_s (other stores: unchanged)."""
    if uri.split("://", 1)[0] not in ("s3", "s3a"):
        return storage_options
    kwargs = {"http_session_cls": deadline_session(deadline_s), **storage_options.get("config_kwargs", {})}
    return {**storage_options, "config_kwargs": kwargs}


def _botocore_checker():
    # botocore's own knowledge of which replies and exceptions are transient (standard retry mode): 500/502/503/504,
    # RequestTimeout, the throttling codes (SlowDown, Throttling, ...), connection errors and timeouts.
    try:
        from botocore.retries.standard import OrRetryChecker, ThrottledRetryableChecker, TransientRetryableChecker
    except ImportError:  # botocore comes with s3fs; without it no botocore errors can occur
        return None
    return OrRetryChecker([TransientRetryableChecker(), ThrottledRetryableChecker()])


def _aiohttp_transient() -> tuple[type[BaseException], ...]:
    # aiobotocore reads bodies through aiohttp: a dropped connection or a body cut short surfaces as these.
    try:
        import aiohttp
    except ImportError:
        return ()
    return (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)


_BOTOCORE = _botocore_checker()
_TRANSIENT_TYPES = (ConnectionError, TimeoutError, http.client.IncompleteRead, *_aiohttp_transient())


def _botocore_says_transient(exc: BaseException) -> bool:
    if _BOTOCORE is None or type(exc).__module__.split(".")[0] != "botocore":
        return False
    from botocore.exceptions import ClientError, IncompleteReadError
    from botocore.retries.standard import RetryContext

    if isinstance(exc, IncompleteReadError):  # a body shorter than its Content-Length: the connection broke
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        context = RetryContext(
            attempt_number=1, parsed_response=exc.response, http_response=SimpleNamespace(status_code=status)
        )
    else:
        context = RetryContext(attempt_number=1, caught_exception=exc)
    return _BOTOCORE.is_retryable(context)


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` may pass if the same call is made again: a connection dropped, refused or cut, a timeout,
    throttling, a 5xx reply. Libraries wrap errors (s3fs turns botocore's ClientError into an OSError whose cause
    it is), so the chain of causes is searched; a missing object or a refused permission is never transient."""
    if isinstance(exc, PERMANENT):
        return False
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if _botocore_says_transient(exc) or isinstance(exc, _TRANSIENT_TYPES):
            return True
        if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
            return True
        exc = exc.__cause__ or _s3fs_lost_cause(exc)
    return False


def _s3fs_lost_cause(exc: BaseException) -> BaseException | None:
    # s3fs's S3File._fetch_range looks at args[0] of any OSError a ranged read raises, and fsspec turns a timeout
    # (botocore's read timeout, the request deadline) into an FSTimeoutError without args: the read then fails
    # with an IndexError raised while handling that timeout, which is what the chain must follow.
    if isinstance(exc, IndexError) and isinstance(exc.__context__, OSError):
        return exc.__context__
    return None


def describe(exc: BaseException) -> str:
    """One line for a log, a manifest or an error message: the type and message, and the cause if it says more."""
    lost = _s3fs_lost_cause(exc)
    if lost is not None:  # s3fs's IndexError says nothing; what it lost does
        return describe(lost)
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__
    if cause is not None and str(cause) not in text:
        text += f" (caused by {type(cause).__name__}: {cause})"
    return text


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff with full jitter (so retrying workers do not hit the store in lockstep) until budget_s is spent."""

    budget_s: float = 60.0
    base_s: float = 0.25
    cap_s: float = 10.0

    def deadline(self) -> float:
        return time.monotonic() + self.budget_s

    def wait(self, attempt: int, deadline: float) -> bool:
        """Sleep before retry number `attempt` (0-based) and return True, or return False: the budget is spent."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(remaining, random.uniform(0, min(self.cap_s, self.base_s * 2**attempt))))
        return True


DEFAULT_RETRY = RetryPolicy()

# Preflight retries what the job's reads and writes would, for a few seconds at most: it asks whether a store
# answers at all, and one that stays down must be reported within seconds (exit 2), not after a job's whole
# retry_for_s. A connection dropped once or twice in a row by a store that is up passes.
PREFLIGHT_RETRY_S = 8.0


def preflight_retry(retry_for_s: float = PREFLIGHT_RETRY_S) -> RetryPolicy:
    """The retry of preflight's requests to a store that the job retries for retry_for_s (input.retry_for_s,
    output.retry_for_s; the models have no such setting)."""
    return RetryPolicy(budget_s=min(retry_for_s, PREFLIGHT_RETRY_S))


def with_retries(call: Callable[[], T], policy: RetryPolicy = DEFAULT_RETRY) -> T:
    """call(), again after each transient failure until the policy's budget is spent; other errors raise at once."""
    deadline = policy.deadline()
    for attempt in itertools.count():
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc) or not policy.wait(attempt, deadline):
                raise
    raise AssertionError("unreachable")


def filesystem(
    uri: str, storage_options: dict | None = None, *, preflight: bool = False
) -> tuple[AbstractFileSystem, str]:
    """(filesystem, path) for `uri`, with bounded waits. S3 gets botocore's standard retry mode, connect/read
    timeouts and a total deadline per request (a user's own `config_kwargs` win) and s3fs's extra retry loop off;
    other stores keep their own."""
    options = dict(storage_options or {})
    s3 = uri.split("://", 1)[0] in ("s3", "s3a")
    if s3:
        settings = S3_PREFLIGHT_SETTINGS if preflight else S3_REQUEST_SETTINGS
        deadline = deadline_session(PREFLIGHT_DEADLINE_S if preflight else REQUEST_DEADLINE_S)
        options["config_kwargs"] = {**settings, "http_session_cls": deadline, **options.get("config_kwargs", {})}
    fs, path = url_to_fs(uri, **options)
    if s3:
        fs.retries = 1  # s3fs's per-call loop: one try, botocore and with_retries do the retrying
        _without_expect_continue(fs)
    return fs, path


def _without_expect_continue(fs) -> None:
    # botocore asks before every S3 upload whether to send the body (`Expect: 100-continue`), and aiohttp waits for
    # that go-ahead with no timeout at all: a store that stops answering hung writes forever. Files here are small
    # enough to send without asking.
    from botocore.handlers import add_expect_header

    fs.connect()  # creates the client (no request is made), or keeps the one it has
    fs.s3.meta.events.unregister("before-call.s3", add_expect_header)
