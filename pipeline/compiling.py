"""What `compute.compile: auto` decides for a job: compile the decode steps, or decode eagerly.

Compiling (specvlm/specdec/compiled.py) pays on a GPU: the steps are replayed as CUDA graphs, with no kernel
launches from Python, and the graphs of a 7B model compile in well under a minute against hours of decoding.
On a CPU the compiled step is faster by a smaller factor (results/compile.md) and its warm-up (eight graphs per
actor with a model draft: the target's one-token, verification and two prompt passes, and the draft's) costs
over a minute (results/job-benchmark.md: a 2,048-image job with compile on ran at 0.37-0.39x), so it pays only on
a job long enough that the saved time exceeds it: auto compiles there when an actor's share of the job is at
least CPU_ROWS_PER_ACTOR rows. The share is estimated before the job starts from the rows of its first shard
(read once here: the listing does not count the records a tar or Parquet file holds) times its shards.
"""

from __future__ import annotations

import itertools

from pipeline.config import JobConfig

# Rows per decode actor from which compiling on a CPU repays its warm-up: ~60 s of warm-up against steps
# ~1.15x faster needs ~7 minutes of eager decoding, about 15,000 demo captions at ~40 rows/s per actor.
CPU_ROWS_PER_ACTOR = 15_000
COUNTED_ROWS = CPU_ROWS_PER_ACTOR + 1  # reading the first shard stops here: enough to decide


def resolve(config: JobConfig, shards: list, gpus_per_actor: float, count_rows) -> tuple[JobConfig, str]:
    """The config with compute.compile set to on or off, and the reason, for the job's log and manifest.
    count_rows(shard, limit): the records of one shard, counted up to limit."""
    choice = config.compute.compile
    if choice != "auto":
        return config, f"compute.compile={choice}"
    if gpus_per_actor > 0:
        return _set(config, "on"), "auto: decode actors run on GPUs"
    if not shards:
        return _set(config, "off"), "auto: nothing to decode"
    rows = count_rows(shards[0], COUNTED_ROWS) * len(shards) / config.compute.actors
    on = rows >= CPU_ROWS_PER_ACTOR
    reason = (
        f"auto: about {rows:,.0f} rows per decode actor on CPU, {'at least' if on else 'under'} the "
        f"{CPU_ROWS_PER_ACTOR:,} from which compiling repays its warm-up"
    )
    return _set(config, "on" if on else "off"), reason


def first_rows(records, limit: int) -> int:
    return sum(1 for _ in itertools.islice(records, limit))


def _set(config: JobConfig, value: str) -> JobConfig:
    return config.model_copy(update={"compute": config.compute.model_copy(update={"compile": value})})
