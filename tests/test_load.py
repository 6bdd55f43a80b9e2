"""Load test (not in the default run; `make load-test`): 10,000 demo images in 100 shards through the demo job.

Reports throughput and the peak memory of the driver and of the Ray workers, and checks that every input row
is written exactly once. SPECVLM_LOAD_SHARDS / SPECVLM_LOAD_PER_SHARD shrink it for a quick try.
"""

import os
import resource
import threading
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.job import run_job
from specvlm.demo.shards import write_webdataset_shards
from tests.test_pipeline import read_output

SHARDS = int(os.environ.get("SPECVLM_LOAD_SHARDS", 100))
PER_SHARD = int(os.environ.get("SPECVLM_LOAD_PER_SHARD", 100))


class PeakMemory:
    """Polls the peak resident memory (VmHWM) of every Ray worker process while the job runs."""

    def __init__(self):
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.wait(0.5):
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    name = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                    if not name.startswith("ray::"):
                        continue
                    status = (proc / "status").read_text()
                except OSError:
                    continue
                kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")), 0)
                self.peaks[int(proc.name)] = (name, max(kib, self.peaks.get(int(proc.name), ("", 0))[1]))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@pytest.mark.load
def test_ten_thousand_images_through_the_demo_job(tmp_path, ray_local):
    write_webdataset_shards(str(tmp_path / "in"), seed=7, num_shards=SHARDS, per_shard=PER_SHARD)
    config = load_config(
        "configs/demo.yaml",
        [
            f"input.uri={tmp_path}/in/*.tar",
            f"output.uri={tmp_path}/out",
            "decode.max_new_tokens=48",
            "output.max_error_fraction=0",
        ],
    )
    start = time.perf_counter()
    with PeakMemory() as memory:
        summary = run_job(config)
    seconds = time.perf_counter() - start

    rows = [
        (r["shard_id"], r["key"])
        for t in read_output(f"{tmp_path}/out").values()
        for r in t.select(["shard_id", "key"]).to_pylist()
    ]
    assert len(rows) == len(set(rows)) == SHARDS * PER_SHARD, "rows lost or duplicated"
    assert summary.errors == 0

    driver_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = sorted(memory.peaks.values(), key=lambda p: -p[1])
    decode_mib = max((kib for name, kib in workers if "DecodeActor" in name), default=0) / 1024
    other_mib = max((kib for name, kib in workers if "DecodeActor" not in name), default=0) / 1024
    report = (
        f"| images | shards | wall s | images/s | tokens/s | tau | driver peak MiB | decode actor peak MiB | "
        f"other worker peak MiB | lost | duplicated |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        f"| {len(rows)} | {SHARDS} | {seconds:.0f} | {len(rows) / seconds:.1f} | {summary.new_tokens / seconds:.0f} | "
        f"{summary.block_efficiency:.2f} | {driver_mib:.0f} | {decode_mib:.0f} | {other_mib:.0f} | 0 | 0 |\n"
    )
    print("\n" + report)
    Path("results").mkdir(exist_ok=True)
    Path("results/load-test.md").write_text(
        "Load test (`make load-test`): the demo caption job on this machine, local Ray, CPU.\n\n" + report
    )
