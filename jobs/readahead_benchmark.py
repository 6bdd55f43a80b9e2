"""How much of a big shard a job holds at once: one shard of many small images (20,000 by default) through the
demo caption job, measuring the object store bytes Ray Data holds and the driver's resident memory.

    python -m jobs.readahead_benchmark                       # one 20,000-row shard
    python -m jobs.readahead_benchmark --rows 4000 --tokens 8  # quicker

A job that reads a shard ahead whole puts every prepared row's pixels in the object store before decoding catches
up, and a driver that holds a shard's decoded rows until the shard is complete grows with it; a bounded job keeps
both flat whatever the shard's size. Printed: the peak and the mean of both over the run, what the shard's prepared
rows take in all, the rows, and the progress lines the job logged.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa

from pipeline.config import load_config
from pipeline.job import run_job
from pipeline.schema import PREPARED_SCHEMA
from pipeline.stages import Preparer, load_processor
from specvlm.data.sources import list_shards, read_shard
from specvlm.demo.shards import write_webdataset_shards

MIB = 1024 * 1024


def resident_bytes() -> int:
    """This process's resident memory (Linux: /proc; psutil is not among the project's dependencies)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


class Sampler:
    """This process's RSS every `every_s` seconds; at every step of Ray Data's scheduler the object store bytes it
    holds by its own count (blocks queued between operators, task inputs, outputs not yet taken), with each
    operator's share at the peak, and the rows read ahead: prepared by the read tasks, not yet decoded. (The
    raylet's own store statistics need gRPC, which a minimal Ray install lacks.)"""

    def __init__(self, every_s: float = 0.5):
        self.every_s = every_s
        self.rss: list[int] = []
        self.store_peak, self.store_sum, self.store_samples = 0, 0, 0
        self.peak_by_operator: dict[str, int] = {}
        self.rows_ahead_peak, self.bytes_per_row = 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.rss.append(resident_bytes())

    def record(self, manager) -> None:
        ops = {op.name.split("[")[0]: op.metrics for op in manager._topology}
        read, decode = ops.get("ReadShard"), ops.get("MapBatches(DecodeActor)")
        if read is not None and decode is not None and read.rows_task_outputs_generated:
            ahead = read.rows_task_outputs_generated - decode.rows_task_outputs_generated
            self.rows_ahead_peak = max(self.rows_ahead_peak, ahead)
            self.bytes_per_row = read.bytes_task_outputs_generated / read.rows_task_outputs_generated
        used = int(manager.get_global_usage().object_store_memory)
        self.store_sum += used
        self.store_samples += 1
        if used > self.store_peak:
            self.store_peak = used
            self.peak_by_operator = {
                op.name: int(usage.object_store_memory) for op, usage in manager._op_usages.items()
            }

    def __enter__(self) -> Sampler:
        from ray.data._internal.execution.resource_manager import ResourceManager

        self._original = ResourceManager.update_usages
        sampler = self

        def update_usages(manager):
            sampler._original(manager)
            sampler.record(manager)

        ResourceManager.update_usages = update_usages
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        from ray.data._internal.execution.resource_manager import ResourceManager

        ResourceManager.update_usages = self._original
        self._stop.set()
        self._thread.join()


def prepared_bytes_per_row(config) -> int:
    """What one prepared row of the job's shard holds (its pixels, token ids and text), as Arrow stores it."""
    (shard,) = list_shards(config.input.uri, config.input.format)
    record = next(iter(read_shard(shard)))
    row = Preparer(config, load_processor(config.model))({**record, "row_index": 0, "is_end": False})
    return pa.Table.from_pylist([row], schema=PREPARED_SCHEMA).nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000, help="images in the one shard")
    parser.add_argument("--tokens", type=int, default=16, help="decode.max_new_tokens (fewer: a quicker run)")
    parser.add_argument("--set", action="append", default=[], help="more config overrides, key=value")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        shards = Path(scratch, "shards")
        write_webdataset_shards(str(shards), seed=29, num_shards=1, per_shard=args.rows)
        overrides = [
            f"input.uri={shards}/*.tar",
            f"output.uri={Path(scratch, 'out')}",
            f"decode.max_new_tokens={args.tokens}",
            "compute.compile='off'",
            *args.set,
        ]
        config = load_config("configs/demo.yaml", overrides)
        prepared = args.rows * prepared_bytes_per_row(config)
        lines: list[str] = []
        started = time.perf_counter()
        with Sampler() as sampler:
            summary = run_job(config, log=lines.append, verbose=False)
        seconds = time.perf_counter() - started
    for line in lines:
        if line.startswith("progress:"):
            print(line)
    rss = sampler.rss
    mean = sampler.store_sum / max(sampler.store_samples, 1)
    print(f"rows {summary.rows}, {seconds:.0f} s, settings: {' '.join(overrides[2:])}")
    print(
        f"object store held by Ray Data: peak {sampler.store_peak / MIB:.0f} MiB, mean {mean / MIB:.0f} MiB; "
        f"the shard's prepared rows: {prepared / MIB:.0f} MiB"
    )
    shares = ", ".join(f"{name} {used / MIB:.0f} MiB" for name, used in sampler.peak_by_operator.items())
    print(f"at the peak: {shares}")
    ahead = sampler.rows_ahead_peak
    print(f"read ahead of decoding: at most {ahead} rows ({ahead * sampler.bytes_per_row / MIB:.0f} MiB prepared)")
    print(f"driver RSS: start {rss[0] / MIB:.0f} MiB, peak {max(rss) / MIB:.0f} MiB, end {rss[-1] / MIB:.0f} MiB")


if __name__ == "__main__":
    main()
