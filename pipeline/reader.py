"""The read stage: a Ray Data datasource with one read task per input shard, and the block size into decoding.

Each read task streams its shard's records, prepares them for the decode actors (image decoding, prompt, the
processor) and yields them in blocks, then one end-marker row: its row_index is the number of rows sent, its
error says why the shard could not be read to its end (None when it was). A shard is never bundled with
another into one task, so its rows reach the driver, and its file lands, as soon as they are decoded, whatever
else is in flight.

Why a datasource, not `map_batches` over a list of shards: Ray Data bundles map inputs up to the largest
batch_size of the operators it fuses (16 shards per task behind a batch-16 map), fuses task maps into the
decode actors (the GPU actor would read and preprocess, and every shard of its bundle would come back at
once), and holds each task's output until it ends. A read task is its own operator: one shard each, never
fused into the actors, and `concurrency` caps how many shards are read at once.

What a crash can lose is what is in flight: the shards being read (compute.shards_per_actor per actor), and the
rows each decode actor holds, a fixed number of blocks (its tasks in flight). Ray Data would size blocks in
bytes (up to 128 MiB: thousands of small images, whole shards), so the job re-cuts them to BLOCK_ROWS rows
(job.build_dataset), and the rows in flight per actor stay bounded whatever the size of a row or a shard.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.config import JobConfig
from pipeline.schema import PREPARED_SCHEMA
from pipeline.stages import Preparer, load_processor
from specvlm.data.retry import RetryPolicy
from specvlm.data.sources import Shard, ShardError, read_shard

READ_BATCH_ROWS = 32  # prepared rows per block: a shard is streamed, never held whole
# Rows per block into the decode actors: a few of their batches, so that each task keeps the engine fed
# (stages.DecodeActor decodes up to 4 batches of a task at once) while tasks in flight stay small.
BLOCK_ROWS = 64


class ShardDatasource(Datasource):
    def __init__(self, shards: list[Shard], config: JobConfig):
        self.shards = shards
        self.config = config

    def estimate_inmemory_data_size(self) -> int | None:
        return None  # unknown before reading; Ray Data then splits no read task's output by size

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        return [
            ReadTask(
                functools.partial(read_and_prepare, shard, self.config),
                BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=[shard.uri]),
            )
            for shard in self.shards
        ]


def read_and_prepare(shard: Shard, config: JobConfig) -> Iterator[pa.Table]:
    """One read task: the shard's prepared rows, numbered, in blocks of READ_BATCH_ROWS, then its end marker."""
    prepare = Preparer(config, load_processor(config.model))
    block, sent, failure = [], 0, None
    records = read_shard(
        shard,
        storage_options=config.input.storage_options,
        image_column=config.input.image_column,
        retry=RetryPolicy(budget_s=config.input.retry_for_s),
    )
    try:
        for record in records:
            rows = prepare.rows({**record, "row_index": sent, "is_end": False})  # one per prompt (task.prompts)
            block += rows
            sent += len(rows)
            if len(block) >= READ_BATCH_ROWS:
                yield pa.Table.from_pylist(block, schema=PREPARED_SCHEMA)
                block = []
    except ShardError as exc:
        failure = str(exc)
    block.append(prepare(end_marker(shard, sent, failure)))
    yield pa.Table.from_pylist(block, schema=PREPARED_SCHEMA)


def end_marker(shard: Shard, rows: int, failure: str | None) -> dict:
    """The record that closes a shard: `rows` rows came before it; `failure` says why the rest never will."""
    empty = dict.fromkeys(["image", "caption", "question", "choices", "answer", "references", "meta"])
    marker = {"key": "", "shard_id": shard.shard_id, "source": shard.uri, **empty, "error": failure}
    return {**marker, "row_index": rows, "is_end": True}
