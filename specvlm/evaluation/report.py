"""The evaluation report: task quality stated once, every strategy checked against the target, time beside it.

Speculative decoding is lossless, so every strategy's output must be the target's, and so its quality. For each
task this scores the target's own output (draft none, "autoregressive"), then every strategy's output at every
batch size: its rows are compared with the target's token for token (any that differ, or fail where the
target's did not, are listed), its quality with the target's, metric for metric. Beside that: the wall time of
each strategy's job, and its speed in the engine's terms (tau, acceptance, MBSU, mean per-sample latency).

Everything is computed from the output Parquet and an index of the runs, so `python -m jobs.score` rebuilds
the report without a model. Output: report.md with PNG plots (plots.py) and metrics.json.
"""

from __future__ import annotations

import json
import math
import posixpath
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.dataset as pads
from fsspec.core import url_to_fs

from specvlm.evaluation.drafting import DraftedSteps, controllers, drafted_steps, stepping_aside
from specvlm.evaluation.quality import score_rows
from specvlm.specdec.metrics import pool

BASELINE = "autoregressive"
INDEX = "evaluation.json"  # the runs of an evaluation, at the root of its output
COLUMNS = [
    "shard_id",
    "key",
    "task",
    "text",
    "prompt",
    "output_ids",
    "reference",
    "references",
    "meta",
    "error",
    "new_tokens",
    "target_calls",
    "draft_calls",
    "accepted_tokens",
    "proposed_tokens",
    "mbsu",
    "latency_s",
    "accepted_per_step",
    "nodes_per_step",
]
SHOWN_MISMATCHES = 20  # rows listed in report.md; metrics.json lists them all
# A strategy drafting on fewer of its steps than this stepped aside, and the report says why. (A row's last step,
# with one token left to generate, is never drafted: a fixed depth drafts on most steps, not all.)
DRAFTED_MOSTLY = 0.9


@dataclass
class Run:
    task: str  # the evaluation's name for it ("caption", "vqa-jsonl", ...)
    strategy: str
    batch: int | str  # compute.batch_size: rows decoded together, or "auto"
    uri: str  # the job's output
    wall_s: float | None = None  # the job's wall time, when one run decoded all of its rows
    ran: str | None = None  # its draft as it ran (drafting.what_ran); None in indexes written before it was kept


@dataclass
class StrategyResult:
    task: str
    strategy: str
    batch: int | str
    samples: int  # rows the target decoded without error
    identical: float  # fraction of those the strategy reproduced token for token
    mismatched: int
    quality_matches: bool  # every metric (and slice) equal to the target's
    tau: float
    acceptance: float
    mbsu: float
    mean_latency_s: float
    decode_speedup: float  # the target's mean per-sample latency over this strategy's, same task and batch
    wall_s: float | None
    wall_speedup: float | None  # the target's job wall time over this strategy's
    ran: str | None = None  # what its draft ran: "chain, adaptive γ ≤ 5" (drafting.what_ran)
    stepped_aside: str | None = None  # why it drafted on few of its steps, where it did (drafting.stepping_aside)
    steps: DraftedSteps = field(default_factory=DraftedSteps, repr=False)  # its steps, drafted and not

    @property
    def label(self) -> str:
        """The strategy's name with what it ran, for figures: a name alone hides that an adaptive γ=5 may not draft."""
        return f"{self.strategy} ({self.ran})" if self.ran else self.strategy


@dataclass
class Report:
    quality: dict[str, dict]  # task -> the target's quality (score_rows), at the first batch size
    results: list[StrategyResult]
    mismatches: list[dict]  # every row that differs from the target's

    @property
    def all_match(self) -> bool:
        return not self.mismatches and all(r.quality_matches for r in self.results)

    def metrics(self) -> dict:
        return {
            "all_match": self.all_match,
            "quality": self.quality,
            "strategies": [
                {k: v for k, v in asdict(r).items() if k != "steps"}
                | {"drafted_steps": r.steps.drafted, "undrafted_steps": r.steps.undrafted}
                for r in self.results
            ],
            "mismatched_rows": self.mismatches,
        }


def read_output(uri: str, storage_options: dict | None = None) -> list[dict]:
    """The rows of a job's output (its *.parquet; `_manifest.json` and `_staging/` are skipped by their `_`)."""
    fs, root = url_to_fs(uri, **(storage_options or {}))
    fs.invalidate_cache()
    dataset = pads.dataset(root, filesystem=fs, format="parquet")
    return dataset.to_table(columns=[c for c in COLUMNS if c in dataset.schema.names]).to_pylist()


def read_index(root: str, storage_options: dict | None = None) -> dict | None:
    """An evaluation's index of runs, or None when `root` is not an evaluation's output."""
    fs, path = url_to_fs(posixpath.join(root, INDEX), **(storage_options or {}))
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def build_report(runs: list[Run], slices: list[str] = (), *, storage_options: dict | None = None, **scoring):
    """`scoring`: score_rows's settings (meteor, tokenizer, vqa_convention)."""
    rows = {(r.task, r.strategy, r.batch): read_output(r.uri, storage_options) for r in runs}
    quality = {
        (r.task, r.strategy, r.batch): score_rows(rows[r.task, r.strategy, r.batch], slices, **scoring) for r in runs
    }
    first_batch = runs[0].batch
    results, mismatches = [], []
    for run in runs:
        base = (run.task, BASELINE, run.batch)
        if base not in rows:
            raise ValueError(f"task {run.task!r} at batch {run.batch} has no {BASELINE!r} run to compare with")
        baseline = next(r for r in runs if (r.task, r.strategy, r.batch) == base)
        differing = _differing_rows(rows[base], rows[run.task, run.strategy, run.batch])
        mismatches += [{"task": run.task, "strategy": run.strategy, "batch": run.batch, **d} for d in differing]
        same = _same_quality(quality[base], quality[run.task, run.strategy, run.batch])
        own = rows[run.task, run.strategy, run.batch]
        results.append(_result(run, own, rows[base], differing, same, baseline.wall_s, storage_options))
    target_quality = {r.task: quality[r.task, BASELINE, r.batch] for r in runs if r.batch == first_batch}
    return Report(target_quality, results, mismatches)


def _result(
    run: Run, rows: list[dict], base_rows: list[dict], differing: list[dict], same: bool, base_wall, storage_options
):
    decoded = [r for r in rows if r["error"] is None]
    pooled = pool(decoded)
    samples = sum(r["error"] is None for r in base_rows)
    latency = _mean([r["latency_s"] for r in decoded])
    base_latency = _mean([r["latency_s"] for r in base_rows if r["error"] is None])
    steps = drafted_steps(decoded)
    aside = None
    if run.strategy != BASELINE and steps.drafted_fraction < DRAFTED_MOSTLY:
        aside = stepping_aside(steps, controllers(run.uri, storage_options))
    return StrategyResult(
        task=run.task,
        strategy=run.strategy,
        batch=run.batch,
        samples=samples,
        identical=(samples - len(differing)) / samples if samples else 0.0,
        mismatched=len(differing),
        quality_matches=same,
        tau=pooled.block_efficiency,
        acceptance=pooled.acceptance_rate,
        mbsu=_mean([r["mbsu"] for r in decoded]),
        mean_latency_s=latency,
        decode_speedup=base_latency / latency if latency else 0.0,
        wall_s=run.wall_s,
        wall_speedup=base_wall / run.wall_s if base_wall and run.wall_s else None,
        ran=run.ran,
        stepped_aside=aside,
        steps=steps,
    )


def _differing_rows(base_rows: list[dict], rows: list[dict]) -> list[dict]:
    """Rows the target decoded that this strategy did not reproduce exactly (missing, failed or other tokens)."""
    by_key = {(r["shard_id"], r["key"]): r for r in rows}
    differing = []
    for base in sorted(base_rows, key=lambda r: (r["shard_id"], r["key"])):
        if base["error"] is not None:
            continue
        row = by_key.get((base["shard_id"], base["key"]))
        if row is None or row["error"] is not None or row["output_ids"] != base["output_ids"]:
            differing.append(
                {
                    "shard_id": base["shard_id"],
                    "key": base["key"],
                    "target": base["text"],
                    "output": None if row is None else row["text"],
                    "error": "row missing" if row is None else row["error"],
                }
            )
    return differing


def _same_quality(a: dict, b: dict) -> bool:
    """Equal metrics, overall and in every slice. Rows are scored in one order, so equal outputs give equal
    floats; the tolerance only absorbs METEOR's printed digits."""
    if a["samples"] != b["samples"] or a["errors"] != b["errors"] or a["metrics"].keys() != b["metrics"].keys():
        return False
    if any(not math.isclose(a["metrics"][m], b["metrics"][m], rel_tol=1e-9, abs_tol=1e-12) for m in a["metrics"]):
        return False
    slices_a, slices_b = a.get("slices", {}), b.get("slices", {})
    if slices_a.keys() != slices_b.keys():
        return False
    return all(
        slices_a[f].keys() == slices_b[f].keys()
        and all(_same_quality(slices_a[f][v], slices_b[f][v]) for v in slices_a[f])
        for f in slices_a
    )


def _mean(values: list) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else 0.0


# ---------------------------------------------------------------- writing


def write_report(report: Report, out: Path) -> Path:
    from specvlm.evaluation.plots import draw_figures

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report.metrics(), indent=2, ensure_ascii=False) + "\n")
    figures = draw_figures(report.results, BASELINE, out)
    lines = ["# Evaluation report", "", *_intro(report), "", "## Quality", "", *_quality_tables(report.quality)]
    lines += ["", "## Same quality, how much sooner", "", *_strategy_table(report.results), ""]
    lines += _stepped_aside_lines(report.results)
    lines += ["## Rows that differ from the target's", "", *_mismatch_lines(report.mismatches), ""]
    lines += [f"![{f}]({f})" for f in figures]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def quality_markdown(quality: dict[str, dict]) -> str:
    """One output's quality (task -> score_rows), with no strategies to compare."""
    return "\n".join(["# Quality", "", *_quality_tables(quality)]) + "\n"


def write_quality_report(quality: dict[str, dict], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"quality": quality}, indent=2, ensure_ascii=False) + "\n")
    path = out / "report.md"
    path.write_text(quality_markdown(quality))
    return path


def _intro(report: Report) -> list[str]:
    verdict = (
        "Every strategy's output equals the target's, row for row, and so does its quality."
        if report.all_match
        else f"**Not every strategy matches the target**: {len(report.mismatches)} rows differ, and "
        f"{sum(not r.quality_matches for r in report.results)} strategy runs score differently (flagged below)."
    )
    return [
        "Each task was decoded by the target alone (`autoregressive`: no draft) and by every strategy, from the "
        "same inputs. Speculative decoding is lossless: in float32 each strategy must reproduce the target's "
        "output token for token, so its quality is the target's. In bf16 or fp16 neither the engine nor the "
        "target's own decoding is batch-invariant, and a strategy may depart from the target where the top two "
        "logits are within rounding of each other, as often as the target departs from itself at another batch "
        "size (measured at LLaVA-1.5's width over 1,024 rows: 10.8% of rows for `generate` at batch 64 against "
        "batch 1, 18.1% for speculative decoding, every departure such a tie; docs/engine.md). The quality is "
        "stated once, for the target; each strategy is checked against it, row by row and metric by metric.",
        "",
        verdict,
    ]


def _quality_tables(quality: dict[str, dict]) -> list[str]:
    lines = ["| task | samples | errors | unscored | metric | value |", "|---|---:|---:|---:|---|---:|"]
    notes, slice_lines = [], []
    for task, q in quality.items():
        for n, (metric, value) in enumerate(q["metrics"].items()):
            counts = f"{q['samples']} | {q['errors']} | {q['unscored']}" if n == 0 else " | | "
            lines.append(f"| {task if n == 0 else ''} | {counts} | {metric} | {_number(value)} |")
        notes += [f"- {task}: {note}" for note in q["notes"]]
        for name, groups in q.get("slices", {}).items():
            metrics = list(next(iter(groups.values()))["metrics"])
            slice_lines += ["", f"{task}, by `{name}`:", "", f"| {name} | samples | {' | '.join(metrics)} |"]
            slice_lines.append("|---|---:|" + "---:|" * len(metrics))
            for value, g in groups.items():
                cells = " | ".join(_number(g["metrics"].get(m)) for m in metrics)
                slice_lines.append(f"| {value} | {g['samples']} | {cells} |")
    return lines + ([""] + notes if notes else []) + slice_lines


def _strategy_table(results: list[StrategyResult]) -> list[str]:
    lines = [
        "Wall time is each job's, start-up (actors, model loading) included; decode speedup compares mean "
        "per-sample latency with the target's, at the same batch size. `drafted`: the share of decoding steps "
        "that verified draft tokens (an adaptive strategy drafts only where it expects drafting to pay); τ and "
        "acceptance count every step.",
        "",
        "| task | batch | strategy | ran | samples | identical | quality = target's | wall s | vs target | "
        "decode speedup | drafted | τ | acceptance | MBSU |",
        "|---|---:|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        identical = f"{r.identical:.0%}" if not r.mismatched else f"**{r.identical:.0%} ({r.mismatched} differ)**"
        wall = f"{r.wall_s:.1f}" if r.wall_s is not None else "-"
        wall_speedup = f"{r.wall_speedup:.2f}x" if r.wall_speedup else "-"
        drafted = f"{r.steps.drafted_fraction:.0%}" if r.steps.drafted + r.steps.undrafted else "-"
        lines.append(
            f"| {r.task} | {r.batch} | {r.strategy} | {r.ran or '-'} | {r.samples} | {identical} | "
            f"{'yes' if r.quality_matches else '**NO**'} | {wall} | {wall_speedup} | {r.decode_speedup:.2f}x | "
            f"{drafted} | {r.tau:.2f} | {r.acceptance:.2f} | {r.mbsu:.2f} |"
        )
    return lines


def _stepped_aside_lines(results: list[StrategyResult]) -> list[str]:
    aside = [r for r in results if r.stepped_aside]
    if not aside:
        return []
    lines = ["## Where a strategy stepped aside", ""]
    lines += [f"- {r.task}, batch {r.batch}, {r.label}: {r.stepped_aside}" for r in aside]
    return lines + [""]


def _mismatch_lines(mismatches: list[dict]) -> list[str]:
    if not mismatches:
        return ["None: every strategy reproduced every row of the target's output."]
    lines = [
        "| task | strategy | batch | shard | key | target's text | strategy's text or error |",
        "|---|---|---:|---|---|---|---|",
    ]
    for m in mismatches[:SHOWN_MISMATCHES]:
        lines.append(
            f"| {m['task']} | {m['strategy']} | {m['batch']} | {m['shard_id']} | {m['key']} | {_cell(m['target'])} | "
            f"{_cell(m['error'] or m['output'])} |"
        )
    if len(mismatches) > SHOWN_MISMATCHES:
        lines.append(f"\n{len(mismatches) - SHOWN_MISMATCHES} more in metrics.json.")
    return lines


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def _number(value) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.3f}"
