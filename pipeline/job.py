"""Running a job: check everything, start (or join) Ray, stream shards through the stages, write, summarise.

    preflight (no Ray yet) -> list shards -> skip finished ones -> read+preprocess tasks -> decode actors
    -> per-shard Parquet files -> manifest and summary

The same code runs on a laptop (embedded local Ray, CPU) and on a cluster (RAY_ADDRESS / `ray job submit`).
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import ConfigError, JobConfig
from pipeline.processor import decode_records, model_fingerprints
from pipeline.sink import OutputDir, ShardCollector
from pipeline.stages import OperatingPoints, read_shards, shard_to_item
from specvlm.data.sources import SourceError, list_shards


class JobFailed(RuntimeError):
    pass


@dataclass
class Summary:
    shards_total: int
    shards_skipped: int  # already written by an earlier run
    shards_written: int
    rows: int  # in the whole output
    errors: int
    new_tokens: int
    target_calls: int
    accepted_tokens: int
    proposed_tokens: int
    run_rows: int  # decoded in this run
    run_tokens: int
    run_seconds: float
    error_breakdown: dict[str, int] = field(default_factory=dict)

    @property
    def error_fraction(self) -> float:
        return self.errors / self.rows if self.rows else 0.0

    @property
    def block_efficiency(self) -> float:
        return self.new_tokens / self.target_calls if self.target_calls else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else 0.0

    def table(self) -> str:
        rate = lambda x: f"{x / self.run_seconds:.2f}" if self.run_seconds else "-"
        lines = [
            ("shards", f"{self.shards_total} ({self.shards_written} written now, {self.shards_skipped} already done)"),
            ("rows", f"{self.rows}"),
            ("errors", f"{self.errors} ({self.error_fraction:.1%})"),
            ("new tokens", f"{self.new_tokens}"),
            ("block efficiency (tau)", f"{self.block_efficiency:.2f}"),
            ("acceptance rate", f"{self.acceptance_rate:.2f}"),
            ("this run: images/s", rate(self.run_rows)),
            ("this run: tokens/s", rate(self.run_tokens)),
        ]
        width = max(len(k) for k, _ in lines)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def preflight(config: JobConfig) -> tuple[OutputDir, list, str]:
    """Everything that can be checked before Ray starts: models, input listing, output writability. Returns the
    output directory, the shards and the hash that output written by this job carries."""
    weights = model_fingerprints(config)
    try:
        shards = list_shards(
            config.input.uri,
            config.input.format,
            storage_options=config.input.storage_options,
            files_per_shard=config.input.files_per_shard,
            **config.input.model_dump(include={"images", "annotations", "split"}),
        )
    except (SourceError, OSError) as exc:
        raise ConfigError(f"input.uri: {exc}") from None
    shards = shards[: config.input.max_shards]
    output = OutputDir(config.output.uri, config.output.storage_options)
    try:
        output.check_writable()
    except OSError as exc:
        raise ConfigError(f"output.uri: cannot write to {config.output.uri}: {exc}") from None
    return output, shards, config.output_hash(weights)


def init_ray(config: JobConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # address="local": an embedded Ray of our own, never a cluster that happens to run on this machine.
        ray.init(address="local", num_cpus=config.ray.num_cpus, include_dashboard=False, log_to_driver=True)


def build_dataset(config: JobConfig, shards: list, config_hash: str, reports=None):
    import ray

    ds = ray.data.from_items([shard_to_item(s) for s in shards], override_num_blocks=len(shards))
    ds = ds.map_batches(
        read_shards, fn_kwargs={"storage_options": config.input.storage_options}, batch_format="pyarrow", batch_size=1
    )
    return decode_records(ds, config, config_hash, reports)


def run_job(config: JobConfig, *, log=print) -> Summary:
    """Run the job to completion. Raises ConfigError before any work, JobFailed past the error limit."""
    output, shards, config_hash = preflight(config)
    done = output.finished(config_hash)
    pending = [s for s in shards if s.shard_id not in done]
    log(f"{len(shards)} shards, {len(done & {s.shard_id for s in shards})} already written, {len(pending)} to do")

    started = time.perf_counter()
    collector = ShardCollector(output, config_hash)
    operating_points = {}
    if pending:
        import ray

        init_ray(config)
        reports = ray.remote(OperatingPoints).options(num_cpus=0).remote()
        dataset = build_dataset(config, pending, config_hash, reports)
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            collector.add(batch)
        operating_points = ray.get(reports.get.remote())
        if collector.incomplete:
            raise JobFailed(f"shards {collector.incomplete} did not receive all their rows; rerun to finish them")
    elapsed = time.perf_counter() - started

    summary = _summarise(output, shards, len(done), collector, elapsed)
    output.write_manifest(_manifest(config, config_hash, summary, collector, operating_points))
    output.clean_staging()
    log(summary.table())
    if summary.error_fraction > config.output.max_error_fraction:
        raise JobFailed(
            f"{summary.errors} of {summary.rows} rows failed ({summary.error_fraction:.1%}), over "
            f"output.max_error_fraction={config.output.max_error_fraction:.1%}; see the error column"
        )
    return summary


def _summarise(output: OutputDir, shards, skipped: int, collector: ShardCollector, elapsed: float) -> Summary:
    numbers = ["new_tokens", "target_calls", "accepted_tokens", "proposed_tokens"]
    table = output.read_all(["shard_id", "error", *numbers])
    ids = {s.shard_id for s in shards}
    table = table.filter(pc.is_in(table["shard_id"], value_set=pa.array(sorted(ids))))
    total = {n: int(pc.sum(table[n]).as_py() or 0) for n in numbers}
    errors = table.filter(pc.is_valid(table["error"]))["error"].to_pylist()
    breakdown: dict[str, int] = {}
    for message in errors:
        kind = message.split(":")[0][:60]
        breakdown[kind] = breakdown.get(kind, 0) + 1
    run_rows = sum(collector.written.values())
    return Summary(
        shards_total=len(shards),
        shards_skipped=skipped,
        shards_written=len(collector.written),
        rows=table.num_rows,
        errors=len(errors),
        run_rows=run_rows,
        run_tokens=collector.tokens,
        run_seconds=elapsed,
        error_breakdown=breakdown,
        **total,
    )


def _manifest(
    config: JobConfig, config_hash: str, summary: Summary, collector: ShardCollector, operating_points: dict
) -> dict:
    import ray
    import torch
    import transformers

    import specvlm

    return {
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "config_hash": config_hash,
        "model": config.model.target,
        "draft": config.draft.label,
        "task": config.task.kind,
        "input": config.input.uri,
        "shards_written_this_run": collector.written,
        # Per decode actor: the running batch it settled on and the speculation controller's measured costs.
        "operating_points": operating_points,
        "summary": {
            **summary.__dict__,
            "error_fraction": summary.error_fraction,
            "block_efficiency": summary.block_efficiency,
            "acceptance_rate": summary.acceptance_rate,
        },
        "versions": {
            "specvlm": specvlm.__version__,
            "torch": torch.__version__,
            "ray": ray.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }
