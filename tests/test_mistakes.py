"""A user's mistakes found before Ray starts: exit 2 in seconds, the config field named; --dry-run."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

DEMO_MODELS = Path("assets/demo/models")


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


def test_a_text_only_lm_as_the_target_is_refused_at_preflight_naming_model_target(tmp_path):
    target = tmp_path / "text-lm"
    shutil.copytree(DEMO_MODELS / "draft-text", target)
    result = run_cli(
        "-m",
        "jobs.caption",
        "--set",
        f"model.target={target}",
        "--set",
        "draft.kind=none",
        "--set",
        f"output.uri={tmp_path / 'out'}",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: model.target: ") and "LLaVA-family vision-language model" in line
    assert "messages from Ray" not in result.stdout


def test_an_output_path_that_is_a_file_is_exit_2_naming_output_uri(tmp_path):
    output = tmp_path / "out.parquet"
    output.write_text("not a folder")
    result = run_cli("-m", "jobs.caption", "--set", f"output.uri={output}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: output.uri: {output} is a file")


def test_dry_run_checks_everything_prints_the_plan_and_starts_nothing(tmp_path):
    out = tmp_path / "out"
    result = run_cli("-m", "jobs.caption", "--dry-run", "--set", f"output.uri={out}", "--set", "input.max_shards=2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 shards, 0 already written, 2 to do" in result.stdout
    assert "rows to decode: about 32" in result.stdout and "compiled decode steps: auto" in result.stdout
    assert "target: assets/demo/models/target" in result.stdout
    assert not list(out.glob("*.parquet")) and not list(out.glob("_logs/*"))

    refused = run_cli("-m", "jobs.vqa", "--dry-run", "--set", "draft.kind=text", "--set", f"output.uri={out}")
    assert refused.returncode == 2 and refused.stderr.startswith("error: draft.kind / draft.path:")


def test_run_history_keeps_the_first_runs_record_on_a_rerun(tmp_path):
    from pipeline.run_history import run_history
    from pipeline.sink import OutputDir

    output = OutputDir(str(tmp_path), {})
    first = {"started_at": "a", "wall_seconds": 60.0, "rows_written": 64, "shards_written": 4, "config_hash": "h"}
    output.write_manifest({"runs": run_history(output, first)})
    rerun = {**first, "started_at": "b", "wall_seconds": 0.0, "rows_written": 0, "shards_written": 0}
    runs = run_history(output, rerun)
    assert runs == [rerun, first]

    (tmp_path / "_manifest.json").write_text(json.dumps({"summary": {"run_seconds": 60.0, "run_rows": 64}}))
    assert run_history(output, rerun)[1]["rows_written"] == 64  # a manifest from before run histories


def test_the_summary_names_error_kinds_example_rows_where_they_all_are_and_the_wall_time():
    from pipeline.job import Summary

    numbers = dict(new_tokens=90, target_calls=30, accepted_tokens=0, proposed_tokens=0, draft_calls=0)
    summary = Summary(
        shards_total=1,
        shards_skipped=0,
        shards_written=1,
        shards_failed=0,
        rows=32,
        errors=4,
        run_rows=32,
        run_tokens=90,
        run_seconds=65.0,
        error_breakdown={"image_missing": 3, "image_corrupt": 1},
        error_examples=["00000/a (image_missing)", "00000/b (image_missing)", "00000/c (image_corrupt)"],
        **numbers,
    )
    table = summary.table()
    assert "4 (12.5%): image_missing 3, image_corrupt 1" in table
    assert "00000/a (image_missing), 00000/b (image_missing), 00000/c (image_corrupt), ... (1 more)" in table
    assert "error column" in table and "this run: wall time     1m05s" in table
