"""Retrying object-storage calls that fail for a moment (throttling, a dropped connection, a 5xx).

botocore and s3fs already retry single requests; this covers what they cannot: a stream that breaks half way
through a shard, or a request that keeps failing for longer than their few quick attempts.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# Errors that say the object is wrong, not the connection: retrying cannot help.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (OSError, TimeoutError)) and not isinstance(exc, PERMANENT)


def backoff(attempt: int, base: float = 0.2, cap: float = 10.0) -> float:
    """Exponential backoff with full jitter, so retrying workers do not hit the store in lockstep."""
    return random.uniform(0, min(cap, base * 2**attempt))


def with_retries(call: Callable[[], T], attempts: int = 5) -> T:
    for attempt in range(attempts):
        try:
            return call()
        except Exception as exc:
            if attempt == attempts - 1 or not is_transient(exc):
                raise
            time.sleep(backoff(attempt))
    raise AssertionError("unreachable")
