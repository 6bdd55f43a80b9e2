"""The evaluation and benchmark jobs: every strategy's output is compared with the target's and reported."""

import json

import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.evaluate import load_evaluate_config, run_evaluation, write_report
from specvlm.demo.shards import write_webdataset_shards
from specvlm.evaluation.benchmark import markdown_table, run_suite
from specvlm.specdec.tree import TreeSettings


def test_evaluate_runs_every_strategy_through_the_pipeline_and_reports(models, tmp_path, ray_local):
    write_webdataset_shards(str(tmp_path / "in"), seed=3, num_shards=3, per_shard=3)
    job = {
        "input": {"uri": f"{tmp_path}/in/*.tar"},
        "output": {"uri": "unused"},
        "model": {"target": str(models / "target")},
        "decode": {"max_new_tokens": 8},
        "compute": {"batch_size": 2},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    draft = [f"draft.path={models / 'draft'}", "draft.kind=vlm"]
    evaluation = {
        "job": str(tmp_path / "job.yaml"),
        "output": str(tmp_path / "runs"),
        "report_dir": str(tmp_path / "report"),
        "max_shards": 2,
        "tasks": {"caption": ["task.kind=caption"], "vqa": ["task.kind=vqa"]},
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
    results = run_evaluation(config, log=lambda *_: None)
    assert {(r.task, r.strategy, r.batch) for r in results} >= {
        ("caption", "vlm tree", 2),
        ("vqa", "prompt lookup", 2),
        ("caption", "vlm chain", 1),
    }
    assert all(r.samples == 6 and r.identical == 1.0 for r in results)  # 2 shards x 3 samples, all identical
    drafted = [r for r in results if r.strategy.startswith("vlm")]
    assert all(r.tau > 1.0 and 0 < r.acceptance < 1 for r in drafted)
    report = write_report(results, tmp_path / "report")
    text = report.read_text()
    assert "| caption | 2 | vlm tree | 6 | 100% |" in text
    for figure in ("tau.png", "speedup.png", "accepted_lengths.png", "speedup_vs_batch.png"):
        assert (tmp_path / "report" / figure).stat().st_size > 1000 and f"]({figure})" in text


def test_evaluate_config_errors_name_the_problem(tmp_path):
    (tmp_path / "eval.yaml").write_text(
        yaml.safe_dump(
            {"job": "configs/demo.yaml", "output": "x", "tasks": {}, "strategies": {"chain": ["draft.gamma=3"]}}
        )
    )
    with pytest.raises(ConfigError, match="autoregressive"):
        load_evaluate_config(str(tmp_path / "eval.yaml"))
    (tmp_path / "eval.yaml").write_text(
        yaml.safe_dump(
            {
                "job": "configs/demo.yaml",
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
        log=lambda *_: None,
    )
    modes = {(r.batch, r.mode) for r in rows}
    assert (1, "HF assisted (text)") in modes and (2, "engine vlm tree") in modes and (2, "replay a=0.9") in modes
    for r in rows:
        if not r.mode.startswith("HF"):
            assert r.identical == 1.0, r.mode
        assert r.speedup_vs_ar > 0 and r.new_tokens > 0
    replay = {r.mode: r for r in rows if r.batch == 1 and r.mode.startswith("replay")}
    assert replay["replay a=0.9"].tau > replay["replay a=0.5"].tau > 1.0
    engine = [r for r in rows if r.mode.startswith("engine vlm")]
    assert all(r.c > 0 and r.limit == pytest.approx(r.tau / (r.c * 3 + 1), rel=0.5) for r in engine)
    # r prices the verification pass (measured per row); replay drafts cost nothing, so only r limits them.
    assert all(r.r > 0 and r.hardware_limit < r.tau / r.r for r in engine)
    assert all(r.hardware_limit == pytest.approx(r.tau / r.r) for r in replay.values())
    table = markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and json.dumps([r.mode for r in rows])
