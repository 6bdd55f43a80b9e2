"""The embedded local Ray of a job run without a cluster, ended with its driver however the driver ends.

ray.init() ties the processes it starts itself (GCS, raylet, monitors) to the driver with the kernel's
parent-death signal, but not what the raylet starts in turn: when the driver is killed with SIGKILL, the
raylet's dashboard and runtime-env agents notice their parent is gone, then wait up to a minute on the dead GCS
before they exit. A watchdog closes that gap: a small process that notes the driver's descendants while the job
runs and, when the driver ends without saying goodbye (SIGKILL, a crash, os._exit), kills those still alive.

The watchdog reads /proc, so it runs on Linux only; elsewhere Ray's own clean-up is all there is. A driver that
joins a cluster (RAY_ADDRESS, `ray job submit`) starts no Ray and no watchdog: the cluster outlives its jobs.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

POLL_S = 1.0  # how often the watchdog notes the driver's descendants (the agents start with Ray and stay)
_GOODBYE = b"bye"
_watchdog: subprocess.Popen | None = None  # held for the driver's lifetime: its end of the pipe must stay open


def start(num_cpus: int | None, **init_options) -> None:
    """ray.init() for a local Ray, with the watchdog started first so it sees every process Ray starts."""
    import ray

    if _watchdog is None and Path("/proc/self/stat").exists():
        _start_watchdog()
    # address="local": always a new instance, never a cluster that `ray start` left current on this machine.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **init_options)


def _start_watchdog() -> None:
    global _watchdog
    # Its own session: a Ctrl-C at the terminal must not stop it before the driver it watches.
    _watchdog = subprocess.Popen(
        [sys.executable, "-m", "pipeline.local_ray", str(os.getpid())], stdin=subprocess.PIPE, start_new_session=True
    )
    # Registered before ray.init(), so it runs after Ray's own shutdown at exit: an orderly exit leaves nothing to
    # kill, and the goodbye tells the watchdog so.
    atexit.register(_say_goodbye)


def _say_goodbye() -> None:
    if _watchdog is not None and _watchdog.stdin is not None:
        _watchdog.stdin.write(_GOODBYE)
        _watchdog.stdin.close()


# ---------------------------------------------------------------- the watchdog process


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) for every process visible in /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it ended while we looked
            continue
        # The command name (field 2) may hold spaces and parentheses: the fields after its last ")" are fixed.
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), fields[19])  # ppid; starttime, which tells a reused pid apart
    return table


def _descendants(root: int, table: dict[int, tuple[int, str]]) -> dict[int, str]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = table[pid][1]
        todo.extend(children.get(pid, []))
    return found


def _watch(driver: int) -> None:
    import select

    seen: dict[int, str] = {}  # pid -> start time of every descendant noted so far
    stdin = sys.stdin.buffer
    while True:
        ready, _, _ = select.select([stdin], [], [], POLL_S)
        if ready:
            if stdin.read() == _GOODBYE:  # read() returns at EOF: the driver has ended
                return
            break
        seen.update(_descendants(driver, _process_table()))
    seen.pop(os.getpid(), None)
    alive = _process_table()
    for pid, started in seen.items():
        if pid in alive and alive[pid][1] == started:
            with contextlib.suppress(ProcessLookupError):  # it ended since
                os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
