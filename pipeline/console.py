"""What a person sees while a job runs: one progress line every few seconds and the summary, not Ray's chatter;
while nothing else is said (starting Ray, loading models, compiling, a slow block), a heartbeat line saying
what the job is doing.

By default Ray Data's progress bars and log lines stay off the console (they still go to the Ray session's log
files, `/tmp/ray/session_latest/logs/` on a local Ray), and so do the Ray workers' own output lines; `--verbose`
brings them back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.expected_rows import ExpectedRows
from specvlm.evaluation.countdown import duration

PROGRESS_EVERY_S = 5.0
HEARTBEAT_EVERY_S = 15.0  # the longest the console stays silent


def quiet_ray() -> None:
    """Ray Data's progress bars and console log lines off in this (the driver's) process; its log files stay."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    data_logger = logging.getLogger("ray.data")
    for handler in list(data_logger.handlers):
        if "File" not in type(handler).__name__:  # Ray Data's SessionFileHandler writes the session's ray-data.log
            data_logger.removeHandler(handler)


@contextlib.contextmanager
def stderr_to_file(path: Path):
    """While the block runs, whatever this process writes to its stderr goes to `path`: Python's warnings and
    log lines, and those native code writes to file descriptor 2 itself (Ray's C++ core worker), which no
    Python logging setting reaches. Yields the path; an empty file is removed at the end."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield path
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if path.stat().st_size == 0:  # a run that never started Ray (a config error, nothing to do) left nothing
            path.unlink()


class Progress:
    """Counts the decoded rows streaming into the driver and logs a line every `every_s` seconds: shards done of
    the total, rows done of the rows expected (pipeline/expected_rows.py; "~" while some are estimated, ">=" while
    the estimate is a lower bound), rows/s, tokens/s, τ so far and the time left at the rows/s so far. Rows, not
    shards, measure how far the job got: a job of a few big shards finishes none of them for most of its run."""

    def __init__(
        self, shards_total: int, expected: ExpectedRows, log, every_s: float = PROGRESS_EVERY_S, clock=time.monotonic
    ):
        self.shards_total = shards_total
        self.expected = expected
        self.log = log
        self.every_s = every_s
        self.clock = clock
        self.started = self.last = clock()
        self.rows = self.tokens = self.target_calls = 0

    def add(self, batch: pa.Table, shards_done: int, counted: dict[str, int]) -> None:
        """counted: shard id -> rows, for the shards whose row count the driver has seen (ShardCollector)."""
        rows = batch.filter(pc.invert(batch["is_end"]))
        self.rows += rows.num_rows
        self.tokens += int(pc.sum(rows["new_tokens"]).as_py() or 0)
        self.target_calls += int(pc.sum(rows["target_calls"]).as_py() or 0)
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            self.log(self.line(shards_done, counted))

    def line(self, shards_done: int, counted: dict[str, int]) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        rows_per_s, tokens_per_s = self.rows / elapsed, self.tokens / elapsed
        tau = f"{self.tokens / self.target_calls:.2f}" if self.target_calls else "-"
        total, exact = self.expected.total(counted)
        mark = "" if exact else ">=" if self.expected.at_least else "~"
        if not exact and self.rows >= total:  # the estimate fell short: how many rows are left is not known
            total, eta = self.rows, "-"
        else:
            eta = duration(max(total - self.rows, 0) / rows_per_s) if rows_per_s > 0 else "-"
        return (
            f"progress: {shards_done}/{self.shards_total} shards, {self.rows}/{mark}{total} rows, "
            f"{rows_per_s:.1f} rows/s, {tokens_per_s:.0f} tokens/s, tau {tau}, ETA {eta}"
        )


class Heartbeat:
    """Logs what the job is doing whenever nothing was logged for `every_s` seconds: Ray's start, the models'
    loading and compiling, and the first block of rows can each take minutes without a line of their own.

    Every line of the job goes through `log`, which is what tells the heartbeat the console is not silent; a
    thread of its own checks every `every_s` seconds (`beat`, which tests call with a fake clock)."""

    def __init__(self, log, every_s: float = HEARTBEAT_EVERY_S, clock=time.monotonic):
        self._log = log
        self.every_s = every_s
        self.clock = clock
        self.started = self.last = clock()
        self.doing, self.status = "checking the config, the data and the models", None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def log(self, line: str) -> None:
        self.last = self.clock()
        self._log(line)

    def phase(self, doing: str, status=None) -> None:
        """What the job does from now on; status(): a few words on how far it got (e.g. rows so far), or None."""
        self.doing, self.status = doing, status

    def beat(self) -> None:
        now = self.clock()
        if now - self.last >= self.every_s:
            so_far = f"{self.status()}, " if self.status else ""
            self.log(f"... {self.doing} ({so_far}{duration(now - self.started)} elapsed)")

    def _run(self) -> None:
        while not self._stop.wait(self.every_s / 3):  # a few checks per interval: a line at most a third late
            self.beat()

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
