"""A "run N/M" line before each of a known number of runs, with the time left estimated from the runs so far:
what `python -m jobs.evaluate` (one job per task and strategy) and `python -m jobs.benchmark` (every mode, round
after round) print, so that a long command says how far it got and how long it will take."""

from __future__ import annotations

import time


class RunCounter:
    """Counts the runs as they start; `total`: how many there will be."""

    def __init__(self, total: int, log=print, clock=time.monotonic):
        self.total = total
        self.log = log
        self.clock = clock
        self.started: float | None = None  # when the first run started
        self.runs = 0  # runs started so far

    def start(self, what: str) -> None:
        """Log "run N/M: what (ETA ...)" as the next run starts. The ETA assumes the runs left, this one included,
        each take the mean time of the runs finished so far; the first run has none to go by."""
        now = self.clock()
        if self.started is None:
            self.started = now
        finished = self.runs
        self.runs += 1
        eta = ""
        if finished:
            left = (now - self.started) / finished * (self.total - finished)
            eta = f" (ETA {duration(left)})"
        self.log(f"run {self.runs}/{self.total}: {what}{eta}")


def duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s" if m else f"{s}s"
