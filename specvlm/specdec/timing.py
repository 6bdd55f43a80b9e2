"""Timing the phases of a decode step without waiting for the device in between.

The depth controller prices a step from its phases (draft, verify, the rest). On a CPU the host clock times
them. On a GPU the host only queues work, and reading the clock after a phase would time the launches alone,
while waiting for the device after each phase would drain its queue three times a step. So each phase boundary
records a CUDA event, and the phases are read off the events after the step's one read of the device, by which
time the device has passed all of them.
"""

from __future__ import annotations

import itertools
import time

import torch


class StepTimer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        """A phase boundary (the first mark starts the step)."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def phases(self) -> list[float]:
        """Seconds between consecutive marks; call after the device has passed the last one (the step's read)."""
        marks, self.marks = self.marks, []
        if self.cuda:
            return [a.elapsed_time(b) / 1000 for a, b in itertools.pairwise(marks)]
        return [b - a for a, b in itertools.pairwise(marks)]


def seconds(device: torch.device) -> float:
    """The host clock, once the device has finished what was queued (for timing whole passes, outside steps)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()
