"""How many rows a job will write, for its progress line's count and time left.

Known before the job reads a record, from the listing or a file's footer:
- an image folder's shard: its image files (sidecars are not rows);
- an annotation layout's shard (COCO, VQAv2, ScienceQA, JSONL): its sample ids;
- a Parquet file (and a Hugging Face dataset's Parquet files): the row count in its footer, one small read for each
  of the first FOOTERS_READ shards.
Estimated otherwise (WebDataset tars and Arrow streams hold no count; Parquet shards past FOOTERS_READ): as many
as the shards known hold on average, else as many as the first shard's records, counted up to a limit (where the
count reaches it, the total is a lower bound, shown as such, and the time left is unknown once rows pass it). A
shard's exact count replaces its estimate as soon as the row closing it reaches the driver
(ShardCollector.row_counts).
With task.prompts, every record is a row per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.parquet as pq

from pipeline.config import JobConfig
from specvlm.data.listing import extension
from specvlm.data.records import IMAGE_EXTENSIONS, Shard
from specvlm.data.retry import filesystem

FOOTERS_READ = 32
LISTED_FORMATS = ("images", "coco", "vqav2", "scienceqa", "jsonl")


@dataclass(frozen=True)
class ExpectedRows:
    shard_ids: tuple[str, ...]
    known: dict[str, int]  # shard id -> its rows, known before reading it
    estimate: float  # rows of each other shard
    at_least: bool = False  # the estimate is the first shard's records counted up to a limit it reached

    @property
    def exact(self) -> bool:
        return len(self.known) == len(self.shard_ids)

    def total(self, counted: dict[str, int]) -> tuple[int, bool]:
        """All the job's rows, and whether that is exact. counted: shard id -> rows, for the shards whose closing
        row has come (their count wins over what was known or estimated)."""
        rows, exact = 0.0, True
        for shard_id in self.shard_ids:
            if shard_id in counted:
                rows += counted[shard_id]
            elif shard_id in self.known:
                rows += self.known[shard_id]
            else:
                rows += self.estimate
                exact = False
        return round(rows), exact


def expected_rows(config: JobConfig, shards: list[Shard], count_records) -> ExpectedRows:
    """count_records(shard, limit): the records of a shard, counted up to limit (job.count_rows), asked about the
    first shard only, and only when no shard's count is known otherwise."""
    from pipeline.compiling import COUNTED_ROWS

    known: dict[str, int] = {}
    for shard in shards:
        records = listed_records(shard)
        if records is None and shard.format in ("parquet", "hf") and len(known) < FOOTERS_READ:
            records = footer_rows(shard, config.input.storage_options)
        if records is not None:
            known[shard.shard_id] = records
    if known:
        estimate = sum(known.values()) / len(known)
    else:
        estimate = count_records(shards[0], COUNTED_ROWS) if shards else 0
    per_record = len(config.task.prompts) if config.task.prompts else 1
    return ExpectedRows(
        tuple(s.shard_id for s in shards),
        {s: n * per_record for s, n in known.items()},
        estimate * per_record,
        at_least=not known and estimate >= COUNTED_ROWS,
    )


def listed_records(shard: Shard) -> int | None:
    """The shard's records as its listing knows them; None where it does not."""
    if shard.format == "images":
        return sum(1 for uri in shard.files if extension(uri) in IMAGE_EXTENSIONS)
    if shard.format in LISTED_FORMATS:
        return len(shard.files)
    return None


def footer_rows(shard: Shard, storage_options: dict) -> int | None:
    """A Parquet file's rows from its footer; None for an Arrow stream, or a file that cannot be read now (the
    job names it when it reads the shard)."""
    if not shard.uri.endswith(".parquet"):
        return None
    try:
        fs, path = filesystem(shard.uri, storage_options)
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    except Exception:
        return None
