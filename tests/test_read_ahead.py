"""A big shard's rows reach decoding in small blocks while it is being read, not in one once it is read whole.

jobs/readahead_benchmark.py measures the same on a 20,000-row shard with the demo models."""

import pytest

from pipeline import job, reader, stages
from pipeline.config import load_config
from specvlm.data.sources import list_shards
from specvlm.demo.shards import write_webdataset_shards

ROWS = 1500


class Echo:
    """A decode actor that decodes nothing (no models to load)."""

    def __init__(self, config, config_hash, reports=None):
        pass

    async def __call__(self, batch):
        yield batch


class ReadBlocks:
    """Ray Data's own counts at each step of its scheduler (the executor runs in this process): the read's blocks
    and their bytes."""

    def __init__(self):
        self.blocks = self.bytes = 0

    def record(self, manager) -> None:
        for op in manager._topology:
            if op.name == "ReadShard":
                self.blocks = op.metrics.num_task_outputs_generated
                self.bytes = op.metrics.bytes_task_outputs_generated


@pytest.fixture
def read_blocks(monkeypatch):
    from ray.data._internal.execution.resource_manager import ResourceManager

    counts = ReadBlocks()
    update = ResourceManager.update_usages

    def update_usages(manager):
        update(manager)
        counts.record(manager)

    monkeypatch.setattr(ResourceManager, "update_usages", update_usages)
    return counts


def test_a_big_shard_is_read_in_blocks_of_bounded_bytes(tmp_path, ray_local, read_blocks, monkeypatch):
    write_webdataset_shards(str(tmp_path / "in"), seed=3, num_shards=1, per_shard=ROWS)
    config = load_config("configs/demo.yaml", [f"input.uri={tmp_path / 'in'}/*.tar", f"output.uri={tmp_path}/out"])
    # Blocks of about 36 prepared demo rows (28 KiB each): a short shard shows what a long one does.
    monkeypatch.setattr(reader, "READ_BLOCK_BYTES", 1024 * 1024)
    monkeypatch.setattr(stages, "DecodeActor", Echo)
    dataset = job.build_dataset(config, list_shards(config.input.uri), "hash")
    rows = 0
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        rows += batch.num_rows
    assert rows == ROWS  # every row once (the shard's last row closes it: no end marker)
    # Gathered into Ray Data's default 128 MiB blocks, the shard's 41 MiB of prepared rows came as one block once
    # read to its end: decoding waited for the whole shard, and held it all at once.
    assert read_blocks.bytes > 40 * 1024 * 1024
    assert read_blocks.blocks >= read_blocks.bytes / (1.5 * 1024 * 1024), (read_blocks.blocks, read_blocks.bytes)
