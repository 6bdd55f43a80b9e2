"""The evaluation and benchmark jobs: every strategy's output is compared with the target's and reported, with the
task quality stated once and checked for every strategy; jobs.score rebuilds the report from the outputs."""

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jobs import score
from pipeline.config import ConfigError
from pipeline.evaluation_run import EvaluateConfig, load_evaluate_config, run_evaluation, with_locations
from specvlm.demo.benchmark import write_demo_benchmark
from specvlm.evaluation.benchmark import markdown_table, run_suite
from specvlm.evaluation.report import Run, build_report, read_index, write_report
from specvlm.specdec.tree import TreeSettings


def test_evaluate_runs_every_strategy_through_the_pipeline_and_reports(models, tmp_path, ray_local):
    bench = write_demo_benchmark(tmp_path / "bench", count=8)
    job = {
        "input": {"uri": "unused"},
        "output": {"uri": "unused"},
        "model": {"target": str(models / "target")},
        "decode": {"max_new_tokens": 8},
        "compute": {"batch_size": 2},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    # Tiny test models: the depth controller would rightly find that drafting does not pay, and step aside.
    draft = [f"draft.path={models / 'draft'}", "draft.kind=vlm", "draft.adaptive=false"]
    coco = [f"input.uri={bench}/annotations/captions_world1.json", f"input.images={bench}/images"]
    evaluation = {
        "job": str(tmp_path / "job.yaml"),
        "output": str(tmp_path / "runs"),
        "report_dir": str(tmp_path / "report"),
        "slices": ["shapes", "has_image"],
        "tasks": {
            "caption": ["task.kind=caption", "input.format=coco", "input.files_per_shard=4", *coco],
            "mc": ["task.kind=mc", "input.format=scienceqa", f"input.uri={bench}/scienceqa/problems.json"],
        },
        "strategies": {
            "autoregressive": ["draft.kind=none"],
            "vlm chain": [*draft, "draft.gamma=3"],
            "vlm tree": [*draft, "draft.mode=tree", "draft.gamma=3"],
            "prompt lookup": ["draft.kind=prompt_lookup"],
        },
        "batch_sizes": [1, 2],
        "sweep_strategies": ["vlm chain"],
    }
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(evaluation, allow_unicode=True))
    config = load_evaluate_config(str(tmp_path / "eval.yaml"))
    lines = []
    runs = run_evaluation(config, log=lines.append)
    assert lines[0] == "run 1/10: autoregressive on caption, batch 2"
    assert [line.split(":")[0] for line in lines] == [f"run {n}/10" for n in range(1, 11)]
    assert lines[-1].startswith("run 10/10: vlm tree on mc, batch 2 (ETA ")  # safe_dump sorted the names
    assert {(r.task, r.strategy, r.batch) for r in runs} == {
        *[(task, s, 2) for task in ("caption", "mc") for s in evaluation["strategies"]],
        ("caption", "autoregressive", 1),
        ("caption", "vlm chain", 1),
    }
    assert all(r.wall_s > 0 for r in runs)
    assert [Run(**r) for r in read_index(str(tmp_path / "runs"))["runs"]] == runs

    report = build_report(runs, config.slices)
    assert report.all_match and not report.mismatches
    assert all(r.samples == 8 and r.identical == 1.0 and r.quality_matches for r in report.results)
    drafted = [r for r in report.results if r.strategy.startswith("vlm")]
    assert all(r.tau > 1.0 and 0 < r.acceptance < 1 for r in drafted)
    # The target's quality, once per task, broken down by the slice fields each layout has.
    assert set(report.quality) == {"caption", "mc"}
    assert set(report.quality["caption"]["metrics"]) >= {"BLEU-4", "ROUGE-L", "CIDEr"}
    assert report.quality["mc"]["slices"]["has_image"]["False"]["samples"] == 1  # the text-only problem
    assert sum(g["samples"] for g in report.quality["caption"]["slices"]["shapes"].values()) == 8

    text = write_report(report, tmp_path / "report").read_text()
    assert "| caption | 2 | vlm tree | tree, fixed depth 3 | 8 | 100% | yes |" in text and "**NO**" not in text
    for figure in ("time.png", "tau.png", "speedup.png", "accepted_lengths.png", "speedup_vs_batch.png"):
        assert (tmp_path / "report" / figure).stat().st_size > 1000 and f"]({figure})" in text
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["all_match"] and len(metrics["strategies"]) == len(runs)

    # Re-scoring needs only the outputs: the same report again.
    assert score.main([str(tmp_path / "runs"), "--report", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["quality"] == metrics["quality"] and again["strategies"] == metrics["strategies"]


def _output(path, texts: dict[str, str], latency: float) -> str:
    """A job output with just the columns the report reads: one row per key, tokens spelled by the text."""
    rows = [
        {
            "shard_id": "s0",
            "key": key,
            "task": "vqa",
            "text": text,
            "output_ids": [ord(c) for c in text],
            "reference": "red",
            "references": ["red"] * 9 + ["blue"],
            "meta": json.dumps({"kind": "colour" if key < "k2" else "size"}),
            "error": None,
            "new_tokens": len(text),
            "target_calls": 2,
            "accepted_tokens": 1,
            "proposed_tokens": 2,
            "mbsu": 1.5,
            "latency_s": latency,
            "accepted_per_step": [1, 0],
        }
        for key, text in texts.items()
    ]
    path.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), path / "s0.parquet")
    return str(path)


def test_report_flags_a_row_that_differs_and_a_quality_that_does_not_match(tmp_path):
    target = {"k0": "red", "k1": "red", "k2": "blue", "k3": "red"}
    runs = [
        Run("vqa", "autoregressive", 8, _output(tmp_path / "ar", target, 2.0), wall_s=30.0),
        Run("vqa", "good draft", 8, _output(tmp_path / "good", target, 1.0), wall_s=12.0),
        Run("vqa", "bad draft", 8, _output(tmp_path / "bad", {**target, "k1": "blue"}, 0.5), wall_s=10.0),
    ]
    report = build_report(runs, ["kind"], meteor=False)
    # k0, k1, k3: 9 of 10 humans said red (1.0); k2: 1 said blue (0.3).
    assert report.quality["vqa"]["metrics"] == {"VQA accuracy": pytest.approx((3 + 0.3) / 4)}
    good, bad = report.results[1:]
    assert (good.identical, good.quality_matches, good.wall_speedup, good.decode_speedup) == (1.0, True, 2.5, 2.0)
    assert (bad.identical, bad.mismatched, bad.quality_matches) == (0.75, 1, False)
    assert report.mismatches == [
        {"task": "vqa", "strategy": "bad draft", "batch": 8, "shard_id": "s0", "key": "k1", "target": "red",
         "output": "blue", "error": None}
    ]  # fmt: skip
    assert not report.all_match
    text = write_report(report, tmp_path / "report").read_text()
    assert "**Not every strategy matches the target**" in text
    assert "| vqa | 8 | bad draft | - | 4 | **75% (1 differ)** | **NO** | 10.0 | 3.00x |" in text
    assert "| vqa | bad draft | 8 | s0 | k1 | red | blue |" in text
    assert "| colour | 2 | 1.000 |" in text  # the target's quality by slice


DEMO_JOB = str(Path("configs/demo.yaml").resolve())  # the evaluation config lives elsewhere, in tmp_path


def test_evaluate_sends_ray_and_library_messages_to_the_run_log(tmp_path, monkeypatch, capfd):
    from jobs import evaluate

    target = {"k0": "red", "k1": "blue"}
    runs = [
        Run("vqa", "autoregressive", 8, _output(tmp_path / "ar", target, 2.0), wall_s=30.0),
        Run("vqa", "chain", 8, _output(tmp_path / "chain", target, 1.0), wall_s=20.0),
    ]

    def chatty_evaluation(config, overrides, verbose):
        assert not verbose  # so Ray starts and runs without its console lines (pipeline.job.init_ray)
        os.write(2, b"INFO worker.py:2003 -- Started a local Ray instance.\n")  # as Ray's own C++ core writes
        return runs

    monkeypatch.setattr(evaluate, "run_evaluation", chatty_evaluation)
    evaluation = {"job": DEMO_JOB, "tasks": {"vqa": ["task.kind=vqa"]}, "strategies": {"autoregressive": []}}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(evaluation))
    flags = ["--config", str(tmp_path / "eval.yaml"), "--output", str(tmp_path / "eval")]
    assert evaluate.main([*flags, "--report", str(tmp_path / "report")]) == 0
    out, err = capfd.readouterr()
    assert "INFO" not in out + err
    (log,) = (tmp_path / "eval" / "_logs").glob("evaluate-*.log")
    assert "Started a local Ray instance" in log.read_text()
    assert f"messages from Ray and the libraries go to {log}" in out and "| vqa | 8 | chain |" in out


def test_evaluate_config_errors_name_the_problem(tmp_path):
    (tmp_path / "eval.yaml").write_text(
        yaml.safe_dump({"job": DEMO_JOB, "output": "x", "tasks": {}, "strategies": {"chain": ["draft.gamma=3"]}})
    )
    with pytest.raises(ConfigError, match="autoregressive"):
        load_evaluate_config(str(tmp_path / "eval.yaml"))
    (tmp_path / "eval.yaml").write_text(
        yaml.safe_dump(
            {
                "job": DEMO_JOB,
                "output": "x",
                "tasks": {"caption": ["task.kind=caption"]},
                "strategies": {"autoregressive": ["draft.gamma=zero"]},
            }
        )
    )
    with pytest.raises(ConfigError, match=r"draft\.gamma"):
        load_evaluate_config(str(tmp_path / "eval.yaml"))


def test_benchmark_suite_compares_every_mode_with_the_target(family):
    requests = family.requests(4)
    eos = (family.tokenizer.eos_token_id,)
    drafts = {
        "vlm chain": lambda: family.draft("vlm_noisy", gamma=3),
        "vlm tree": lambda: family.draft("vlm_noisy", gamma=3, tree=TreeSettings(topk=2, beam=2, max_nodes=8)),
        "text chain": lambda: family.draft("text_copy", gamma=3),
        "prompt lookup": lambda: family.draft("prompt_lookup", gamma=3),
    }
    lines = []
    rows = run_suite(
        family.target,
        drafts,
        {"text": family.drafts["text_copy"]},
        requests,
        max_new_tokens=10,
        eos=eos,
        pad_id=0,
        batches=(1, 2),
        repeats=1,
        log=lines.append,
    )
    # A warm-up and one timed round of every mode: (2 baselines, 4 drafts, HF assisted, 3 replays) at batch 1,
    # the same less HF assisted at batch 2.
    counted = [line for line in lines if line.startswith("run ")]
    assert [line.split(":")[0] for line in counted] == [f"run {n}/38" for n in range(1, 39)]
    assert counted[0] == "run 1/38: engine autoregressive, batch 1, warm-up"
    assert counted[-1].startswith("run 38/38: replay a=0.9, batch 2, round 1/1 (ETA ")
    modes = {(r.batch, r.mode) for r in rows}
    assert (1, "HF assisted (text)") in modes and (2, "engine vlm tree") in modes and (2, "replay a=0.9") in modes
    for r in rows:
        if not r.mode.startswith("HF"):
            assert r.identical == 1.0, r.mode
        assert r.speedup_vs_ar > 0 and r.new_tokens > 0
        # Engine modes are also timed over their decoding steps alone; Hugging Face's cannot be split.
        assert (r.decoding_speedup_vs_ar is None) == r.mode.startswith("HF"), r.mode
        assert r.timing.decoding_median is None or r.timing.decoding_median < r.timing.median
    replay = {r.mode: r for r in rows if r.batch == 1 and r.mode.startswith("replay")}
    assert replay["replay a=0.9"].tau > replay["replay a=0.5"].tau > 1.0
    engine = [r for r in rows if r.mode.startswith("engine vlm")]
    assert all(r.c > 0 and r.limit == pytest.approx(r.tau / (r.c * 3 + 1), rel=0.5) for r in engine)
    # r prices the verification pass (measured per row); replay drafts cost nothing, so only r limits them.
    assert all(r.r > 0 and r.hardware_limit < r.tau / r.r for r in engine)
    assert all(r.hardware_limit == pytest.approx(r.tau / r.r) for r in replay.values())
    table = markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and json.dumps([r.mode for r in rows])


@pytest.mark.parametrize(
    "flags,overrides,config_output,expected",
    [
        # nothing given: out/evaluate-<name>, the report inside it
        ({}, [], None, ("out/evaluate-demo", "out/evaluate-demo/report", [])),
        # the config's own output, the report beside the runs
        ({}, [], "/data/eval", ("/data/eval", "/data/eval/report", [])),
        # a user's --set output.uri is kept: it holds the whole evaluation, and leaves the per-run overrides
        ({}, ["output.uri=mine", "draft.gamma=3"], "/data/eval", ("mine", "mine/report", ["draft.gamma=3"])),
        # the flags win; an object-storage output keeps its report on local disk
        ({"output": "s3://bucket/eval/", "report_dir": "r"}, ["output.uri=mine"], None, ("s3://bucket/eval", "r", [])),
        ({"output": "s3://bucket/eval"}, [], None, ("s3://bucket/eval", "out/evaluate-demo/report", [])),
    ],
)
def test_evaluation_output_and_report_locations(flags, overrides, config_output, expected):
    config = EvaluateConfig(job=DEMO_JOB, output=config_output, tasks={}, strategies={"autoregressive": []})
    located, kept = with_locations(config, "demo", overrides, **flags)
    assert (located.output, located.report_dir, kept) == expected
