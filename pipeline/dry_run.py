"""`--dry-run`: every check a job makes before it starts Ray, then what it would run, without running it.

Preflight is the job's own (storage, listing, models, the task's fields in the first records), so a dry run that
passes means the job starts; only the decode actors' GPUs are unknown without Ray, and with them the choice
`compute.compile: auto` makes on a cluster.
"""

from __future__ import annotations

from pipeline import compiling
from pipeline.config import JobConfig
from pipeline.job import count_rows, plan_job


def dry_run(config: JobConfig, retry_errors: bool = False) -> list[str]:
    """The lines describing what the job would do; raises ConfigError (or ResumeConflict) as the job would."""
    plan = plan_job(config, retry_errors)
    lines = ["dry run: config, data and models checked; Ray not started, nothing decoded or written"]
    lines.append(plan.line(retry_errors))
    lines += plan.shard_plan.report(plan.output.uri)
    first = count_rows(config)(plan.pending[0], compiling.COUNTED_ROWS) if plan.pending else 0
    if plan.pending:
        bound = "at least " if first >= compiling.COUNTED_ROWS else "about "
        lines.append(
            f"rows to decode: {bound}{first * len(plan.pending):,} ({first:,} in the first shard to do, "
            f"{plan.pending[0].shard_id}, times {len(plan.pending)} shards)"
        )
    d, c = config.decode, config.compute
    sampling = "greedy" if d.temperature == 0 else f"temperature {d.temperature}, top_k {d.top_k}, top_p {d.top_p}"
    lines += [
        f"task: {config.task.kind}, input {config.input.uri} ({config.input.format}), output {config.output.uri}",
        f"target: {config.model.target} ({config.model.dtype})",
        f"draft: {_draft(config)}",
        f"decode: {sampling}, max_new_tokens {d.max_new_tokens}, seed {d.seed}",
        f"compute: {c.actors} decode actor(s), num_gpus {c.num_gpus}, batch_size {c.batch_size}",
        f"compiled decode steps: {_compile_choice(config, plan.pending, lambda shard, limit: first)}",
        f"output hash: {plan.config_hash}",
    ]
    return lines


def _draft(config: JobConfig) -> str:
    draft = config.draft
    if draft.kind == "none":
        return "none (plain decoding)"
    depth = f"gamma {draft.gamma}" + (", adaptive" if draft.adaptive else ", always full depth")
    return f"{draft.label}, {depth}"


def _compile_choice(config: JobConfig, pending: list, first_shard_rows) -> str:
    if config.compute.compile != "auto" or config.compute.num_gpus != "auto":
        gpus = 0.0 if config.compute.num_gpus == "auto" else float(config.compute.num_gpus)
        return compiling.resolve(config, pending, gpus, first_shard_rows)[1]
    _, on_cpu = compiling.resolve(config, pending, 0.0, first_shard_rows)
    return f"auto: on where the decode actors get GPUs; without GPUs, {on_cpu.removeprefix('auto: ')}"
