"""Re-scoring outputs with `python -m jobs.score`: the settings it scores with, and where they come from."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jobs import score
from pipeline.config import ConfigError
from pipeline.evaluation_run import load_evaluate_config
from specvlm.evaluation.report import INDEX


def _write(folder: Path, rows: list[dict], rows_per_file: int = 1000) -> str:
    folder.mkdir(parents=True)
    for first in range(0, len(rows), rows_per_file):
        shard = f"{first // rows_per_file:05d}"
        chunk = [{"shard_id": shard, "error": None, **r} for r in rows[first : first + rows_per_file]]
        pq.write_table(pa.Table.from_pylist(chunk), folder / f"{shard}.parquet")
    return str(folder)


VQA_ROWS = [  # all ten humans identical: "Yes" scores 1 for lmms-eval, 0 for the official script
    {"key": "1", "task": "vqa", "text": "Yes", "reference": "yes", "references": ["yes"] * 10, "meta": None},
    {"key": "2", "task": "vqa", "text": "no", "reference": "no", "references": ["no"] * 10, "meta": None},
]


def _quality(report: Path) -> dict:
    return json.loads((report / "metrics.json").read_text())["quality"]


def test_score_takes_the_vqa_convention_from_its_flag(tmp_path):
    output = _write(tmp_path / "out", VQA_ROWS)
    assert score.main([output, "--report", str(tmp_path / "default")]) == 0
    assert score.main([output, "--vqa-convention", "official", "--report", str(tmp_path / "official")]) == 0
    default, official = _quality(tmp_path / "default")["vqa"], _quality(tmp_path / "official")["vqa"]
    assert (default["vqa_convention"], default["metrics"]["VQA accuracy"]) == ("lmms-eval", 1.0)
    assert (official["vqa_convention"], official["metrics"]["VQA accuracy"]) == ("official", 0.5)
    assert "vqaEval.py" in (tmp_path / "official" / "report.md").read_text()  # the report names it


def test_score_of_an_evaluation_uses_the_convention_its_config_named(tmp_path):
    decoded = {"output_ids": [1], "new_tokens": 1, "target_calls": 1, "draft_calls": 0, "accepted_tokens": 0}
    decoded |= {"proposed_tokens": 0, "mbsu": 1.0, "latency_s": 0.1, "accepted_per_step": []}
    _write(tmp_path / "eval" / "runs" / "ar", [{**r, **decoded} for r in VQA_ROWS])
    index = {
        "report_dir": str(tmp_path / "report"),
        "slices": [],
        "vqa_convention": "official",
        "caption_tokenizer": "ptb-python",
        "runs": [{"task": "vqa", "strategy": "autoregressive", "batch": 1, "uri": str(tmp_path / "eval/runs/ar")}],
    }
    (tmp_path / "eval" / INDEX).write_text(json.dumps(index))
    assert score.main([str(tmp_path / "eval"), "--no-meteor"]) == 0
    assert _quality(tmp_path / "report")["vqa"]["metrics"]["VQA accuracy"] == 0.5
    assert score.main([str(tmp_path / "eval"), "--vqa-convention", "lmms-eval", "--report", str(tmp_path / "r")]) == 0
    assert _quality(tmp_path / "r")["vqa"]["metrics"]["VQA accuracy"] == 1.0  # the flag wins


def test_evaluation_config_names_a_wrong_vqa_convention(tmp_path):
    config = {
        "job": str(Path("configs/demo.yaml").resolve()),
        "tasks": {"vqa": ["task.kind=vqa"]},
        "strategies": {"autoregressive": ["draft.kind=none"]},
    }
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump({**config, "vqa_convention": "official"}))
    assert load_evaluate_config(str(tmp_path / "ok.yaml")).vqa_convention == "official"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**config, "vqa_convention": "vqav2"}))
    with pytest.raises(ConfigError, match="vqa_convention"):
        load_evaluate_config(str(tmp_path / "bad.yaml"))


def test_an_evaluation_report_reads_the_prompt_so_a_letter_past_the_choices_is_unparsed(tmp_path):
    """The report scores multiple choice as jobs.score does: a letter counts only within the prompt's choices."""
    from specvlm.data.prompts import format_choices
    from specvlm.evaluation.quality import score_rows
    from specvlm.evaluation.report import read_output

    prompt = format_choices("Which colour?", ["red", "blue"])  # choices (a) and (b)
    rows = [
        {
            "key": str(i),
            "task": "mc",
            "text": text,
            "prompt": prompt,
            "reference": "a",
            "references": None,
            "meta": None,
        }
        for i, text in enumerate(["The answer is E.", "The answer is A."])
    ]
    read = read_output(_write(tmp_path / "out", rows))
    assert [r["prompt"] for r in read] == [prompt, prompt]
    quality = score_rows(read)
    assert quality["metrics"] == {"accuracy": 0.5, "unparsed": 1}, quality
