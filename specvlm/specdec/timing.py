"""Timing the phases of a decode step without waiting for the device in between.

The depth controller prices a step from its phases (draft, verify, the rest). On a CPU the host clock times
them. On a GPU the host only queues work, and reading the clock after a phase would time the launches alone,
while waiting for the device after each phase would drain its queue three times a step. So each phase boundary
records a CUDA event, and the phases are read off the events after the step's one read of the device, by which
time the device has passed all of them.

On a CPU that other processes share, the wall clock times them too: a step that lost the core for a moment
takes several times its own time (on two cores at load 20, most of the demo's steps took 2-4x). When torch
computes on one thread, the one that calls it, that thread's CPU time is the step's own work and leaves the
others' out; with more threads the wall clock stays (idle threads spin, and their CPU time would count as work).
The controller compares depths with each other, and a busy machine slows all of them alike, so its choice is
the same on either clock, only far less noisy on the first.
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
            self.marks.append(host_clock())

    def phases(self) -> list[float]:
        """Seconds between consecutive marks; call after the device has passed the last one (the step's read)."""
        marks, self.marks = self.marks, []
        if self.cuda:
            return [a.elapsed_time(b) / 1000 for a, b in itertools.pairwise(marks)]
        return [b - a for a, b in itertools.pairwise(marks)]


def host_clock() -> float:
    """Seconds that price the host's work: the calling thread's CPU time when torch computes on it alone, else the
    wall clock (see the module docstring)."""
    return time.thread_time() if torch.get_num_threads() == 1 else time.perf_counter()


def seconds(device: torch.device) -> float:
    """The clock that prices passes, once the device has finished what was queued (for timing whole passes,
    outside steps): the wall clock on a GPU, host_clock on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return host_clock()
