"""Evaluation runs: the same inputs through the target alone and through every draft strategy, via the pipeline.

For each task and strategy the job config is run with that strategy's overrides, so evaluation scales like any
job. Each run's output and wall time go into an index (`evaluation.json` at the root of the evaluation's
output), from which specvlm.evaluation.report scores and compares them, here or later (`python -m jobs.score`).
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.config import ConfigError, JobConfig, load_config, rebase, resolve_relative_path
from pipeline.job import init_ray, run_job
from specvlm.evaluation.countdown import RunCounter
from specvlm.evaluation.drafting import what_ran
from specvlm.evaluation.report import BASELINE, INDEX, Run, read_index


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    job: str  # the job config every run starts from
    # URI under which each run writes its Parquet, and the index of runs (default: out/evaluate-<config name>)
    output: str | None = None
    report_dir: str | None = None  # local folder for report.md, metrics.json and the plots (default: <output>/report)
    slices: list[str] = Field(default_factory=list)  # metadata fields to break quality down by, where inputs have them
    max_shards: int | None = Field(None, ge=1)  # evaluate on the first N input shards only
    tasks: dict[str, list[str]]  # task name -> --set overrides
    strategies: dict[str, list[str]]  # strategy name -> --set overrides; must include "autoregressive"
    batch_sizes: list[int] = Field(default_factory=list)  # speedup vs batch size, first task, every strategy
    sweep_strategies: list[str] = Field(default_factory=list)  # strategies in the sweep (default: all)
    # How VQA accuracy is computed (specvlm.evaluation.answers): lmms-eval's VQAv2 scoring, which normalises every
    # prediction, or the VQA authors' vqaEval.py, which compares raw strings where all ten humans agree.
    vqa_convention: Literal["lmms-eval", "official"] = "lmms-eval"
    # Whose tokens caption metrics score (specvlm.evaluation.ptb): pycocoevalcap's Java PTB tokenizer, or its
    # reproduction in Python; default: ptb-java where `java` is on PATH, else ptb-python.
    caption_tokenizer: Literal["ptb-java", "ptb-python"] | None = None


def load_evaluate_config(path: str, overrides: list[str] = ()) -> EvaluateConfig:
    """The evaluation config at `path`. Its relative paths (job, output, report_dir, and the locations its task
    and strategy overrides set) are relative to its own folder, as in a job config (config.PATH_FIELDS)."""
    try:
        tree = yaml.safe_load(Path(path).read_text()) or {}
        tree = _resolve_relative_paths(tree, Path(path).parent) if isinstance(tree, dict) else tree
        config = EvaluateConfig.model_validate(tree)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"evaluation config {path}: {exc}") from None
    if BASELINE not in config.strategies:
        raise ConfigError(f"evaluation config {path}: strategies must include {BASELINE!r} (draft.kind=none)")
    for task_sets in config.tasks.values():  # every run's config is checked before any starts
        for sets in config.strategies.values():
            load_config(config.job, [*task_sets, *sets, *overrides])
    return config


def _resolve_relative_paths(tree: dict, folder: Path) -> dict:
    def sets(overrides):
        if not isinstance(overrides, list):
            return overrides
        resolved = []
        for text in overrides:
            key, _, value = str(text).partition("=")
            resolved.append(f"{key}={resolve_relative_path(key.strip(), value, folder)}" if value else text)
        return resolved

    tree = {**tree, **{k: rebase(tree[k], folder) for k in ("job", "output", "report_dir") if k in tree}}
    for group in ("tasks", "strategies"):
        if isinstance(tree.get(group), dict):
            tree[group] = {name: sets(overrides) for name, overrides in tree[group].items()}
    return tree


def with_locations(
    config: EvaluateConfig,
    name: str,
    overrides: list[str],
    output: str | None = None,
    report_dir: str | None = None,
) -> tuple[EvaluateConfig, list[str]]:
    """Where an evaluation writes: `output` (--output), else a `--set output.uri=...` among the overrides (which
    then applies to the whole evaluation, each run in its own folder below it), else the config's `output`, else
    out/evaluate-<name>; the report in `report_dir` (--report), else the config's, else <output>/report for a
    local output (out/evaluate-<name>/report for one in object storage). Returns the config with both set, and
    the overrides without output.uri."""
    user_output = None
    kept = []
    for text in overrides:
        key, _, value = text.partition("=")
        if key.strip() == "output.uri":
            user_output = value
        else:
            kept.append(text)
    default = f"out/evaluate-{slug(name)}"
    root = (output or user_output or config.output or default).rstrip("/")
    local = "://" not in root or root.startswith("file://")
    beside = f"{root.removeprefix('file://')}/report" if local else f"{default}/report"
    report = report_dir or config.report_dir or beside
    return config.model_copy(update={"output": root, "report_dir": report}), kept


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_evaluation(config: EvaluateConfig, overrides: list[str] = (), log=print, verbose: bool = True) -> list[Run]:
    """Run every task x strategy (x batch size, for the first task) as a job; return the runs, also written to the
    index. A run whose output was already complete keeps the wall time an earlier evaluation measured. Before
    each run `log` gets "run N/M: ..." with the time left. verbose=False: Ray's log lines and progress bars stay
    off the console, as in a job (run_job)."""
    root = config.output.rstrip("/")
    storage_options = load_config(config.job, overrides).output.storage_options
    timed = {
        (r["task"], r["strategy"], r["batch"]): r["wall_s"]
        for r in (read_index(root, storage_options) or {}).get("runs", [])
    }
    planned = _planned_runs(config, load_config(config.job, overrides).compute.batch_size)
    counter = RunCounter(len(planned), log)
    runs = []
    for task, batch, strategy in planned:
        uri = f"{root}/runs/{slug(task)}/b{batch}/{slug(strategy)}"
        extra = [f"output.uri={uri}", f"compute.batch_size={batch}", "output.max_error_fraction=1"]
        if config.max_shards:
            extra.append(f"input.max_shards={config.max_shards}")
        job = load_config(config.job, [*config.tasks[task], *config.strategies[strategy], *overrides, *extra])
        init_ray(job, verbose)  # before the first timed job: Ray's start-up is no strategy's time
        counter.start(f"{strategy} on {task}, batch {batch}")
        summary = run_job(job, log=lambda *_: None, verbose=verbose)
        whole = summary.rows > 0 and summary.run_rows == summary.rows
        wall = summary.run_seconds if whole else timed.get((task, strategy, batch))
        runs.append(Run(task, strategy, batch, uri, wall, ran=_what_ran(job)))
        _write_index(root, storage_options, config, runs)
    return runs


def _what_ran(job: JobConfig) -> str:
    """The job's draft as the engine runs it: the controller adapts the depth only under greedy decoding."""
    greedy = job.decode.greedy
    draft = job.draft
    return what_ran(draft.kind, draft.mode, draft.depth(greedy), draft.adaptive and greedy)


def _planned_runs(config: EvaluateConfig, default_batch) -> list[tuple[str, int | str, str]]:
    """(task, batch size, strategy) of every run, in the order they run: each task at the job's batch size, then
    the first task at the other batch sizes, with the sweep's strategies."""
    first_task = next(iter(config.tasks))
    sweep = [b for b in config.batch_sizes if b != default_batch]
    swept = config.sweep_strategies + [BASELINE] if config.sweep_strategies else list(config.strategies)
    planned = []
    for task in config.tasks:
        for batch in [default_batch] + (sweep if task == first_task else []):
            strategies = config.strategies if batch == default_batch else [s for s in config.strategies if s in swept]
            planned += [(task, batch, strategy) for strategy in strategies]
    return planned


def _write_index(root: str, storage_options: dict, config: EvaluateConfig, runs: list[Run]) -> None:
    index = {
        "report_dir": config.report_dir,
        "slices": config.slices,
        "vqa_convention": config.vqa_convention,
        "caption_tokenizer": config.caption_tokenizer,
        "runs": [asdict(r) for r in runs],
    }
    with fsspec.open(posixpath.join(root, INDEX), "w", **storage_options) as f:
        json.dump(index, f, indent=2, ensure_ascii=False)
