"""The read stage: a Ray Data datasource whose read tasks each read a group of consecutive input shards, and the
block size into decoding.

A read task reads its shards' records one shard after another, prepares them for the decode actors (image
decoding, prompt, the processor) and yields them READ_BATCH_ROWS at a time. A shard's last row closes it: it
carries the shard's row count and why the shard could not be read to its end (None when it was); a shard
without rows gets an end-marker row (`is_end`) instead. Rows of consecutive shards share blocks, so a shard's
rows reach the driver, and its file lands, as soon as they are decoded, whatever else is in flight. (A marker
per shard would double the rows of one-image shards, and each marker takes a place among the rows a decode
actor holds.)

Why groups: a read task has a fixed cost (scheduling, its worker's turn, reporting its blocks), about 45 ms on a
loaded 2-core machine. One task per shard paid it for every shard: 2,048 one-image shards ran at a third of the
images/s of 128 shards of 16. A group holds at most MAX_SHARDS_PER_TASK shards, and there are at least
TASKS_PER_READER groups per concurrent reader, so reading still spreads over every reader to the end of a job.
Grouping changes nothing about what is in flight: a task reads one shard at a time.

Why a datasource, not `map_batches` over a list of shards: Ray Data bundles map inputs up to the largest
batch_size of the operators it fuses (16 shards per task behind a batch-16 map), fuses task maps into the
decode actors (the GPU actor would read and preprocess, and every shard of its bundle would come back at
once), and holds each task's output until it ends. A read task is its own operator, never fused into the
actors, and `concurrency` caps how many shards are read at once.

What a crash can lose is what is in flight: the shards being read (compute.shards_per_actor per actor), and the
rows each decode actor holds, a fixed number of blocks (its tasks in flight). Ray Data sizes blocks in bytes:
it gathers what a read task yields into blocks of up to 128 MiB (thousands of small images, whole shards)
before they leave the task, so the job re-cuts them to BLOCK_ROWS rows (job.build_dataset), and the rows each
decode actor holds stay bounded whatever the size of a row or a shard.

Known limit: read-ahead is not bounded. A running read task reads its shard to the end whatever the actors
hold, and its rows wait in Ray's object store until an actor takes them. One 20,000-row shard of demo images
was read ahead whole (545 MiB of prepared rows, 773 MiB peak in the object store;
jobs/readahead_benchmark.py). The number of shards read at once is bounded, their rows are not.
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
from specvlm.data.retry import RetryPolicy, with_request_deadline
from specvlm.data.sources import Shard, ShardError, read_shard

READ_BATCH_ROWS = 32  # prepared rows per yield; Ray Data gathers yields into blocks of up to 128 MiB
TASKS_PER_READER = 4
MAX_SHARDS_PER_TASK = 64
# A read task waits on storage much of its time. With a whole CPU each, a 2-CPU node beside a 1-CPU decode actor
# ran one read task at a time (not compute.shards_per_actor), and a read stuck on a slow store stalled the job
# (job.build_dataset says what else it took).
READ_TASK_CPUS = 0.5
# Rows per block into the decode actors: a few of their batches, so that each task keeps the engine fed
# (stages.DecodeActor decodes up to 4 batches of a task at once) while tasks in flight stay small.
BLOCK_ROWS = 64


def shard_groups(shards: list[Shard], readers: int) -> list[list[Shard]]:
    """Consecutive shards in groups, one read task each: at least TASKS_PER_READER groups per reader where there
    are enough shards, at most MAX_SHARDS_PER_TASK shards per group."""
    size = max(1, min(MAX_SHARDS_PER_TASK, len(shards) // (readers * TASKS_PER_READER)))
    return [shards[i : i + size] for i in range(0, len(shards), size)]


class ShardDatasource(Datasource):
    def __init__(self, shards: list[Shard], config: JobConfig, readers: int):
        self.groups = shard_groups(shards, readers)
        self.config = config

    def estimate_inmemory_data_size(self) -> int | None:
        return None  # unknown before reading; Ray Data then splits no read task's output by size

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        return [
            ReadTask(
                functools.partial(read_and_prepare, group, self.config),
                BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=[s.uri for s in group]),
            )
            for group in self.groups
        ]


def read_and_prepare(shards: list[Shard], config: JobConfig) -> Iterator[pa.Table]:
    """One read task: each shard's prepared rows, numbered, the last closing the shard, in blocks of
    READ_BATCH_ROWS."""
    prepare = Preparer(config, load_processor(config.model))
    i = config.input
    block = []
    for shard in shards:
        # The newest record's rows are held back: the last of them may be the row closing the shard.
        held, sent, failure = [], 0, None
        records = read_shard(
            shard,
            storage_options=with_request_deadline(shard.uri, i.storage_options, i.request_deadline_s),
            image_column=i.image_column,
            retry=RetryPolicy(budget_s=i.retry_for_s),
        )
        try:
            for record in records:
                block += held
                if len(block) >= READ_BATCH_ROWS:
                    yield pa.Table.from_pylist(block, schema=PREPARED_SCHEMA)
                    block = []
                held = prepare.rows({**record, "row_index": sent, "is_end": False})  # one per prompt (task.prompts)
                sent += len(held)
        except ShardError as exc:
            failure = str(exc)
        held = held or [prepare(end_marker(shard, sent))]
        block += held[:-1]
        block.append({**held[-1], "shard_rows": sent, "shard_error": failure})
    if block:
        yield pa.Table.from_pylist(block, schema=PREPARED_SCHEMA)


def end_marker(shard: Shard, rows: int) -> dict:
    """The record that closes a shard without rows of its own: `rows` (0) rows came before it."""
    empty = dict.fromkeys(["image", "caption", "question", "choices", "answer", "references", "meta", "error"])
    marker = {"key": "", "shard_id": shard.shard_id, "source": shard.uri, **empty}
    return {**marker, "row_index": rows, "is_end": True}
