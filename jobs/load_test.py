"""Load test: demo images through the caption job (embedded local Ray, CPU), with throughput and the resident
memory of the driver and of the decode actor sampled over the whole run. A benchmark, not part of the suite.

    python -m jobs.load_test                    # `make load-test`: 10,000 images in 100 shards
    python -m jobs.load_test --images 100000    # does memory stay flat over a long run?

Writes the table to out/load-test.md (--report; `--report results/load-test.md` refreshes the committed table on
purpose), and exits non-zero if a row is lost or written twice.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

from pipeline.config import load_config
from pipeline.job import run_job
from pipeline.sink import OutputDir
from specvlm.demo.shards import write_webdataset_shards

DECILES = 10


def _status_kib(pid: int | str, field: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # the process ended
        return 0
    return next((int(line.split()[1]) for line in text.splitlines() if line.startswith(field + ":")), 0)


def _cpu_seconds(pid: int | str) -> float:
    """User + system CPU time a process has used so far."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()  # the fields after the command name; utime, stime: 12, 13
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ray_workers() -> dict[int, str]:
    """pid -> process title of every Ray worker on this machine (titles start with "ray::")."""
    workers = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::"):
            workers[int(proc.name)] = title
    return workers


class MemorySampler:
    """Samples, once a second, the memory of this process (the driver) and of the decode actor, and keeps every Ray
    worker's peak resident memory (VmHWM). Per sample: VmRSS, everything resident, and RssAnon, the process's own
    memory: resident memory also counts the pages of Ray's shared object store a process has touched, which grow
    as blocks pass through it until the store recycles them, and are not the process's to leak."""

    def __init__(self):
        # (seconds since start, driver VmRSS, driver RssAnon, decode actor VmRSS, decode actor RssAnon), KiB
        self.samples: list[tuple[float, int, int, int, int]] = []
        self.peaks: dict[int, tuple[str, int]] = {}  # worker pid -> (title, peak KiB)
        # CPU time of every Ray worker, the last seen: on a shared machine, CPU seconds per image are a steadier
        # measure of what the pipeline costs than wall time.
        self.cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        start = time.monotonic()
        while not self._stop.wait(1.0):
            actor = (0, 0)
            for pid, title in _ray_workers().items():
                peak = _status_kib(pid, "VmHWM")
                self.peaks[pid] = (title, max(peak, self.peaks.get(pid, ("", 0))[1]))
                self.cpu[pid] = max(self.cpu.get(pid, 0.0), _cpu_seconds(pid))
                if "DecodeActor" in title:
                    actor = max(actor, (_status_kib(pid, "VmRSS"), _status_kib(pid, "RssAnon")))
            driver = (_status_kib("self", "VmRSS"), _status_kib("self", "RssAnon"))
            self.samples.append((time.monotonic() - start, *driver, *actor))

    def __enter__(self):
        self._driver_cpu_at_start = _cpu_seconds("self")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time while the job ran: the driver (this process), the decode actor, the other Ray workers."""
        actor = sum(cpu for pid, cpu in self.cpu.items() if "DecodeActor" in self.peaks[pid][0])
        return {
            "driver": _cpu_seconds("self") - self._driver_cpu_at_start,
            "decode actor": actor,
            "other workers": sum(self.cpu.values()) - actor,
        }

    def peak_mib(self, decode_actor: bool) -> float:
        return (
            max((kib for title, kib in self.peaks.values() if ("DecodeActor" in title) == decode_actor), default=0)
            / 1024
        )

    def over_the_run(self) -> list[tuple[int, ...]]:
        """(percent of the run, then the four memory figures in MiB) at each tenth of the run, from the actor's
        start."""
        running = [s for s in self.samples if s[3]]
        if not running:
            return []
        picks = [running[min(len(running) - 1, len(running) * k // DECILES)] for k in range(1, DECILES + 1)]
        return [(100 * k // DECILES, *(kib // 1024 for kib in s[1:])) for k, s in zip(range(1, DECILES + 1), picks)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.load_test", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000, help="demo images to caption (default: %(default)s)")
    parser.add_argument("--per-shard", type=int, default=100, help="images per shard (default: %(default)s)")
    parser.add_argument("--report", default="out/load-test.md", help="Markdown table (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    args = parser.parse_args(argv)
    shards = -(-args.images // args.per_shard)

    with tempfile.TemporaryDirectory(prefix="specvlm-load-") as work:
        write_webdataset_shards(f"{work}/in", seed=7, num_shards=shards, per_shard=args.per_shard)
        config = load_config(
            "configs/demo.yaml",
            [
                f"input.uri={work}/in/*.tar",
                f"output.uri={work}/out",
                "decode.max_new_tokens=48",
                "output.max_error_fraction=0",
                *args.set,
            ],
        )
        start = time.perf_counter()
        with MemorySampler() as memory:
            summary = run_job(config)
        seconds = time.perf_counter() - start
        table = OutputDir(f"{work}/out", {}).read_all(["shard_id", "key"])
        manifest = json.loads(Path(f"{work}/out/_manifest.json").read_text())

    rows = list(zip(table["shard_id"].to_pylist(), table["key"].to_pylist()))
    cpu = memory.cpu_seconds()
    images = shards * args.per_shard
    lost, duplicated = images - len(set(rows)), len(rows) - len(set(rows))
    report = (
        "| images | shards | wall s | images/s | tokens/s | CPU s per 1000 images | tau | driver peak MiB | "
        "decode actor peak MiB | other worker peak MiB | most shards held at once | lost | duplicated |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        f"| {images} | {shards} | {seconds:.0f} | {images / seconds:.1f} | {summary.new_tokens / seconds:.0f} | "
        f"{1000 * sum(cpu.values()) / images:.1f} | "
        f"{summary.pooled.block_efficiency:.2f} | {_status_kib('self', 'VmHWM') / 1024:.0f} | "
        f"{memory.peak_mib(decode_actor=True):.0f} | {memory.peak_mib(decode_actor=False):.0f} | "
        f"{manifest['most_shards_held_at_once']} | {lost} | {duplicated} |\n\n"
        "CPU seconds per 1000 images: "
        + ", ".join(f"{name} {1000 * seconds / images:.1f}" for name, seconds in cpu.items())
        + ".\n\nMemory over the run, from the decode actor's start (MiB; RSS: resident, with the object-store pages "
        "the process touched; own: RssAnon, its private memory):\n\n"
        "| % of the run | driver RSS | driver own | decode actor RSS | decode actor own |\n|---:|---:|---:|---:|---:|\n"
        + "".join("| " + " | ".join(map(str, row)) + " |\n" for row in memory.over_the_run())
    )
    print("\n" + report)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(
        f"Load test (`python -m jobs.load_test --images {args.images}`): the demo caption job on this machine, "
        "local Ray, CPU.\n\n" + report
    )
    return 1 if lost or duplicated else 0


if __name__ == "__main__":
    raise SystemExit(main())
