"""Evaluation: the same inputs through the target alone and through every draft strategy, via the pipeline.

For each task and strategy the job config is run with that strategy's overrides (so evaluation scales like any
job), then the outputs are joined per sample with the autoregressive run: identity (greedy: token for token),
block efficiency tau, acceptance, MBSU and the latency speedup. The report is Markdown with PNG plots in the
manner of paper 002's Figure 2: tau and speedup per strategy and task, the distribution of accepted lengths,
and speedup against batch size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.config import ConfigError, load_config
from pipeline.job import run_job
from pipeline.sink import OutputDir

BASELINE = "autoregressive"


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    job: str  # the job config every run starts from
    output: str  # URI under which each run writes its Parquet
    report_dir: str = "results/evaluate"  # local directory for report.md and its plots
    max_shards: int | None = Field(None, ge=1)  # evaluate on the first N input shards only
    tasks: dict[str, list[str]]  # task name -> --set overrides
    strategies: dict[str, list[str]]  # strategy name -> --set overrides; must include "autoregressive"
    batch_sizes: list[int] = Field(default_factory=list)  # speedup vs batch size, first task, every strategy
    sweep_strategies: list[str] = Field(default_factory=list)  # strategies in the sweep (default: all)


def load_evaluate_config(path: str, overrides: list[str] = ()) -> EvaluateConfig:
    try:
        tree = yaml.safe_load(Path(path).read_text()) or {}
        config = EvaluateConfig.model_validate(tree)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"evaluation config {path}: {exc}") from None
    if BASELINE not in config.strategies:
        raise ConfigError(f"evaluation config {path}: strategies must include {BASELINE!r} (draft.kind=none)")
    for task_sets in config.tasks.values():  # every run's config is checked before any starts
        for sets in config.strategies.values():
            load_config(config.job, [*task_sets, *sets, *overrides])
    return config


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@dataclass
class StrategyResult:
    task: str
    strategy: str
    batch: int
    samples: int
    identical: float
    tau: float
    acceptance: float
    mbsu: float
    mean_latency_s: float
    speedup: float = 0.0  # mean autoregressive latency / mean latency, same task and batch size
    accepted_lengths: list[int] = field(default_factory=list)


def run_evaluation(config: EvaluateConfig, overrides: list[str] = (), log=print) -> list[StrategyResult]:
    results = []
    first_task = next(iter(config.tasks))
    default_batch = load_config(config.job, overrides).compute.batch_size
    sweep = [b for b in config.batch_sizes if b != default_batch]
    for task, task_sets in config.tasks.items():
        for batch in [default_batch] + (sweep if task == first_task else []):
            outputs = {}
            for strategy, sets in config.strategies.items():
                if (
                    batch != default_batch
                    and config.sweep_strategies
                    and strategy not in (config.sweep_strategies + [BASELINE])
                ):
                    continue
                uri = f"{config.output.rstrip('/')}/runs/{slug(task)}/b{batch}/{slug(strategy)}"
                extra = [f"output.uri={uri}", f"compute.batch_size={batch}", "output.max_error_fraction=1"]
                if config.max_shards:
                    extra.append(f"input.max_shards={config.max_shards}")
                job = load_config(config.job, [*task_sets, *sets, *overrides, *extra])
                log(f"== {task} / {strategy} / batch {batch}")
                run_job(job, log=lambda *_: None)
                outputs[strategy] = OutputDir(uri, job.output.storage_options).read_all(
                    [
                        "shard_id",
                        "key",
                        "output_ids",
                        "error",
                        "new_tokens",
                        "target_calls",
                        "accepted_tokens",
                        "proposed_tokens",
                        "mbsu",
                        "latency_s",
                        "accepted_per_step",
                    ]
                )
            results += _compare(task, batch, outputs)
    return results


def _compare(task: str, batch: int, outputs: dict[str, pa.Table]) -> list[StrategyResult]:
    def by_sample(table: pa.Table) -> dict:
        return {(r["shard_id"], r["key"]): r for r in table.to_pylist() if r["error"] is None}

    baseline = by_sample(outputs[BASELINE])
    results = []
    for strategy, table in outputs.items():
        rows = by_sample(table)
        common = [k for k in rows if k in baseline]
        picked = [rows[k] for k in common]
        calls = sum(r["target_calls"] for r in picked) or 1
        proposed = sum(r["proposed_tokens"] for r in picked)
        results.append(
            StrategyResult(
                task=task,
                strategy=strategy,
                batch=batch,
                samples=len(common),
                identical=sum(rows[k]["output_ids"] == baseline[k]["output_ids"] for k in common) / max(len(common), 1),
                tau=sum(r["new_tokens"] for r in picked) / calls,
                acceptance=sum(r["accepted_tokens"] for r in picked) / proposed if proposed else 0.0,
                mbsu=sum(r["mbsu"] for r in picked) / max(len(picked), 1),
                mean_latency_s=sum(r["latency_s"] for r in picked) / max(len(picked), 1),
                accepted_lengths=[a for r in picked for a in r["accepted_per_step"]],
            )
        )
    base_latency = next(r.mean_latency_s for r in results if r.strategy == BASELINE)
    for r in results:
        r.speedup = base_latency / r.mean_latency_s if r.mean_latency_s else 0.0
    return results


def write_report(results: list[StrategyResult], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    default = [r for r in results if r.batch == results[0].batch]
    tasks = list(dict.fromkeys(r.task for r in default))
    strategies = list(dict.fromkeys(r.strategy for r in default))

    def grouped_bars(metric: str, ylabel: str, name: str) -> str:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(strategies)), 3.6))
        width = 0.8 / len(tasks)
        for i, task in enumerate(tasks):
            values = [
                next((getattr(r, metric) for r in default if r.task == task and r.strategy == s), 0) for s in strategies
            ]
            ax.bar([x + i * width for x in range(len(strategies))], values, width, label=task)
        ax.set_xticks(
            [x + width * (len(tasks) - 1) / 2 for x in range(len(strategies))], strategies, rotation=30, ha="right"
        )
        return save(fig, ax, name, None, ylabel, legend_size=None)

    def save(fig, ax, name: str, xlabel: str | None, ylabel: str, legend_size: int | None = 7) -> str:
        if xlabel:
            ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=legend_size)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        return name

    figures = [
        grouped_bars("tau", "block efficiency τ", "tau.png"),
        grouped_bars("speedup", "latency speedup vs autoregressive", "speedup.png"),
    ]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in default:
        if r.task == tasks[0] and r.strategy != BASELINE and r.accepted_lengths:
            ax.hist(
                r.accepted_lengths,
                bins=range(0, max(r.accepted_lengths) + 2),
                histtype="step",
                label=r.strategy,
                density=True,
            )
    figures.append(
        save(fig, ax, "accepted_lengths.png", f"accepted draft tokens per step ({tasks[0]})", "fraction of steps")
    )

    batches = sorted({r.batch for r in results})
    if len(batches) > 1:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for s in strategies:
            points = sorted((r.batch, r.speedup) for r in results if r.strategy == s and r.task == tasks[0])
            if s != BASELINE and len(points) > 1:
                ax.plot(*zip(*points), marker="o", label=s)
        figures.append(save(fig, ax, "speedup_vs_batch.png", "batch size", "latency speedup vs autoregressive"))

    lines = [
        "# Evaluation report",
        "",
        "Each strategy decoded the same samples; `identical` compares its output token by token with the "
        "target's autoregressive output. Speedup is the mean per-sample latency of autoregressive decoding "
        "over the strategy's, at the same batch size.",
        "",
        "| task | batch | strategy | samples | identical | τ | acceptance | MBSU | speedup |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.task} | {r.batch} | {r.strategy} | {r.samples} | {r.identical:.0%} | {r.tau:.2f} | "
            f"{r.acceptance:.2f} | {r.mbsu:.2f} | {r.speedup:.2f} |"
        )
    lines += [""] + [f"![{f}]({f})" for f in figures]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
