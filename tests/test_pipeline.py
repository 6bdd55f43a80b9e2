"""The Ray Data pipeline end to end: shards in (local and a real S3 endpoint) -> Parquet out, checked row by row."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
import s3fs
import torch
from transformers import AutoModelForImageTextToText

from pipeline import job as job_module
from pipeline.config import ConfigError, load_config
from pipeline.job import JobFailed, run_job
from pipeline.schema import OUTPUT_SCHEMA
from pipeline.sink import ResumeConflict
from specvlm.data.error_kinds import kind_of
from specvlm.data.images import decode_image
from specvlm.data.prompts import format_choices
from specvlm.data.sources import list_shards, read_shard
from specvlm.demo.shards import write_parquet_shards, write_webdataset_shards
from specvlm.demo.world import make_scene
from specvlm.models.build import build_text_lm, build_tokenizer
from specvlm.models.loading import decode_parameters
from specvlm.specdec.requests import Request
from tests.badfiles import write_bad_image_corpus

MAX_NEW = 10
GAMMA = 3
SEED, SHARDS, PER_SHARD = 5, 3, 4

# Per-sample columns that depend on the draft depths the controller chose, which follow measured timings.
SCHEDULE_COLUMNS = [
    "target_calls",
    "draft_calls",
    "proposed_tokens",
    "accepted_tokens",
    "accepted_per_step",
    "nodes_per_step",
    "block_efficiency",
    "acceptance_rate",
    "mbsu",
]


def config_for(models, input_uri, output_uri, *extra, endpoint=None):
    overrides = [
        f"input.uri={input_uri}",
        f"output.uri={output_uri}",
        f"model.target={models / 'target'}",
        "draft.kind=vlm",
        f"draft.path={models / 'draft'}",
        f"draft.gamma={GAMMA}",
        "draft.adaptive=false",  # tiny test models: the controller would rightly find drafting does not pay
        f"decode.max_new_tokens={MAX_NEW}",
        "compute.batch_size=4",
        "output.max_error_fraction=0",
        *extra,
    ]
    if endpoint:
        overrides += [
            f"input.storage_options.endpoint_url={endpoint}",
            f"output.storage_options.endpoint_url={endpoint}",
        ]
    return load_config(None, overrides)


def read_output(uri, endpoint=None):
    options = {"endpoint_url": endpoint} if endpoint else {}
    fs, root = fsspec.core.url_to_fs(uri, **options)
    fs.invalidate_cache()
    tables = {}
    for path in sorted(fs.glob(f"{root}/*.parquet")):
        with fs.open(path, "rb") as f:
            tables[os.path.basename(path)] = pq.read_table(f)
    return tables


def expected_tokens(family, record, prompt):
    """The target's own greedy continuation of the same image and prompt (Hugging Face generate)."""
    encoded = family.processor(images=decode_image(record["image"]), text=prompt, return_tensors="pt")
    return family.reference(Request(encoded.input_ids[0].tolist(), encoded.pixel_values), MAX_NEW)


def check_against_inputs(family, tables, input_uri, endpoint=None, files_per_shard=1000):
    options = {"endpoint_url": endpoint} if endpoint else {}
    shards = list_shards(input_uri, storage_options=options, files_per_shard=files_per_shard)
    assert sorted(tables) == sorted(f"{s.shard_id}.parquet" for s in shards)
    for shard in shards:
        table = tables[f"{shard.shard_id}.parquet"]
        assert table.schema.remove_metadata() == OUTPUT_SCHEMA
        rows = table.to_pylist()
        records = list(read_shard(shard, storage_options=options))
        assert [r["key"] for r in rows] == [r["key"] for r in records]  # every input row once, in order
        for row, record in zip(rows, records):
            assert row["error"] is None and row["stop_reason"] in ("eos", "max_tokens")
            # source: the tar or Parquet file; for an image folder the image file itself.
            assert (row["shard_id"], row["source"], row["task"]) == (shard.shard_id, record["source"], "caption")
            assert row["output_ids"] == expected_tokens(family, record, row["prompt"])
            assert row["text"] == family.tokenizer.decode(row["output_ids"], skip_special_tokens=True).strip()
            check_metric_identities(row, family)
            assert row["draft"].startswith("vlm-chain:") and len(row["config_hash"]) == 16
            assert row["reference"] == record["caption"]


def check_metric_identities(row, family):
    """Every metric column of a decoded row against its definition (docs/output.md, Output schema) and the others."""
    steps = row["target_calls"]
    assert steps == len(row["accepted_per_step"]) == len(row["nodes_per_step"]) > 0
    assert row["accepted_tokens"] == sum(row["accepted_per_step"])
    assert row["proposed_tokens"] == sum(row["nodes_per_step"]) >= row["accepted_tokens"]
    assert row["new_tokens"] == len(row["output_ids"]) == row["accepted_tokens"] + steps
    assert all(0 <= a <= n <= GAMMA for a, n in zip(row["accepted_per_step"], row["nodes_per_step"]))
    assert steps <= row["draft_calls"] <= GAMMA * steps  # a chain: one draft forward per proposed token, at most
    assert row["block_efficiency"] == pytest.approx(row["new_tokens"] / steps)
    assert row["acceptance_rate"] == pytest.approx(row["accepted_tokens"] / row["proposed_tokens"])
    c = decode_parameters(family.drafts["vlm_noisy"]) / decode_parameters(family.target)
    assert row["mbsu"] == pytest.approx(row["new_tokens"] / (steps + c * row["draft_calls"]))
    assert row["latency_s"] > 0 and row["tokens_per_s"] == pytest.approx(row["new_tokens"] / row["latency_s"])
    if row["stop_reason"] == "max_tokens":
        assert row["new_tokens"] == MAX_NEW
    else:
        assert row["stop_reason"] == "eos" and row["output_ids"][-1] == family.tokenizer.eos_token_id


def test_caption_job_on_local_webdataset_matches_target_greedy(family, models, tmp_path, ray_local):
    write_webdataset_shards(str(tmp_path / "in"), seed=SEED, num_shards=SHARDS, per_shard=PER_SHARD)
    config = config_for(models, f"{tmp_path}/in/*.tar", f"{tmp_path}/out")
    summary = run_job(config, log=lambda *_: None)
    assert (summary.rows, summary.errors, summary.shards_written) == (SHARDS * PER_SHARD, 0, SHARDS)
    assert 0 < summary.pooled.acceptance_rate < 1
    tables = read_output(f"{tmp_path}/out")
    check_against_inputs(family, tables, f"{tmp_path}/in/*.tar")
    assert (tmp_path / "out" / "_manifest.json").exists() and not (tmp_path / "out" / "_staging").exists()
    c = decode_parameters(family.drafts["vlm_noisy"]) / decode_parameters(family.target)
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["summary"]["mbsu_cost_ratio"] == pytest.approx(c, rel=1e-4)  # the c the rows' mbsu used


def _write_image_folder(fs, root):
    for i in range(5):
        scene = make_scene(SEED, i)
        buffer = io.BytesIO()
        scene.image.save(buffer, format="PNG")
        fs.pipe(f"{root}/img{i}.png", buffer.getvalue())
        fs.pipe(f"{root}/img{i}.txt", scene.caption.encode())


@pytest.mark.parametrize("layout", ["webdataset", "parquet", "images"])
def test_s3_shards_to_s3_parquet(family, models, s3_bucket, s3_endpoint, ray_local, layout):
    bucket, _ = s3_bucket
    options = {"endpoint_url": s3_endpoint}
    src, dst = f"s3://{bucket}/in", f"s3://{bucket}/out"
    if layout == "webdataset":
        write_webdataset_shards(src, seed=SEED, num_shards=2, per_shard=3, storage_options=options)
        uri = f"{src}/*.tar"
    elif layout == "parquet":
        write_parquet_shards(src, seed=SEED, num_shards=2, per_shard=3, storage_options=options)
        uri = f"{src}/*.parquet"
    else:
        _write_image_folder(s3fs.S3FileSystem(**options), f"{bucket}/in")
        uri = src
    config = config_for(models, uri, dst, "input.files_per_shard=2", endpoint=s3_endpoint)
    run_job(config, log=lambda *_: None)
    check_against_inputs(family, read_output(dst, s3_endpoint), uri, s3_endpoint, files_per_shard=2)


def test_vqa_and_multiple_choice_prompts_come_from_the_records(family, models, tmp_path, ray_local):
    write_webdataset_shards(str(tmp_path / "in"), seed=SEED, num_shards=1, per_shard=3)
    scenes = [make_scene(SEED, i) for i in range(3)]
    run_job(config_for(models, f"{tmp_path}/in", f"{tmp_path}/vqa", "task.kind=vqa"), log=lambda *_: None)
    rows = read_output(f"{tmp_path}/vqa")["00000.parquet"].to_pylist()
    assert [r["prompt"] for r in rows] == [f"USER: <image>\n{s.question} ASSISTANT:" for s in scenes]
    assert [r["reference"] for r in rows] == [s.answer for s in scenes]

    mc = config_for(
        models,
        f"{tmp_path}/in",
        f"{tmp_path}/mc",
        "task.kind=mc",
        "input.fields.question=mc_question",
        "input.fields.answer=answer_index",
    )
    run_job(mc, log=lambda *_: None)
    rows = read_output(f"{tmp_path}/mc")["00000.parquet"].to_pylist()
    assert [r["prompt"] for r in rows] == [
        f"USER: <image>\n{format_choices(s.mc_question, s.choices)} ASSISTANT:" for s in scenes
    ]
    assert [r["reference"] for r in rows] == ["abcd"[s.answer_index] for s in scenes]


def test_rerun_skips_finished_shards_and_redoes_missing_ones(models, tmp_path, ray_local):
    write_webdataset_shards(str(tmp_path / "in"), seed=SEED, num_shards=SHARDS, per_shard=PER_SHARD)
    draft = tmp_path / "draft"
    shutil.copytree(models / "draft", draft)
    config = config_for(models, f"{tmp_path}/in", f"{tmp_path}/out", f"draft.path={draft}")
    run_job(config, log=lambda *_: None)
    first = read_output(f"{tmp_path}/out")
    (tmp_path / "out" / "00001.parquet").unlink()
    summary = run_job(config, log=lambda *_: None)
    assert (summary.shards_skipped, summary.shards_written, summary.rows) == (SHARDS - 1, 1, SHARDS * PER_SHARD)
    again = read_output(f"{tmp_path}/out")
    # Timings, and the speculation schedule the controller picked from them, differ between runs; the rows'
    # content may not.
    varying = ["latency_s", "tokens_per_s", *SCHEDULE_COLUMNS]
    assert {k: t.drop(varying) for k, t in again.items()} == {k: t.drop(varying) for k, t in first.items()}

    with pytest.raises(ResumeConflict, match="other settings"):
        run_job(
            config_for(models, f"{tmp_path}/in", f"{tmp_path}/out", f"draft.path={draft}", "decode.max_new_tokens=5"),
            log=print,
        )

    # The same settings, but the draft retrained in place: its output must not be resumed into.
    retrained = AutoModelForImageTextToText.from_pretrained(draft)
    with torch.no_grad():
        retrained.lm_head.weight.mul_(1.01)
    retrained.save_pretrained(draft)
    with pytest.raises(ResumeConflict, match="other settings"):
        run_job(config, log=print)


def job_command(models, input_uri, output_uri, *sets):
    """The caption job's command line on the test models, with its own local Ray."""
    return [
        sys.executable,
        "-m",
        "jobs.caption",
        "--config",
        os.devnull,
        f"--set=input.uri={input_uri}",
        f"--set=output.uri={output_uri}",
        f"--set=model.target={models / 'target'}",
        "--set=draft.kind=vlm",
        f"--set=draft.path={models / 'draft'}",
        "--set=ray.num_cpus=2",
        *(f"--set={s}" for s in sets),
    ]


def _live_processes_in_group(group: int) -> list[int]:
    """Processes of a process group that have not ended (zombies waiting to be reaped have)."""
    alive = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, ...
        if entry.name.isdigit() and int(fields[2]) == group and fields[0] != "Z":
            alive.append(int(entry.name))
    return alive


def test_shard_files_land_as_they_finish_and_a_kill_9_loses_only_the_shards_in_flight(models, tmp_path):
    """24 shards, one decode actor: the first file lands while most shards are pending; the driver is then killed
    with SIGKILL. Its local Ray ends with it; a rerun redoes only the shards without a file, each row exactly once."""
    shards, per_shard = 24, 16  # a block of 64 rows into decoding holds 4 shards: they land together
    write_webdataset_shards(str(tmp_path / "in"), seed=SEED, num_shards=shards, per_shard=per_shard)
    out = tmp_path / "out"
    args = job_command(models, tmp_path / "in", out, "decode.max_new_tokens=16", "compute.batch_size=1")
    env = {**os.environ, "RAY_ADDRESS": ""}
    with (tmp_path / "first.log").open("w") as log:
        # Its own process group, which every process of its local Ray inherits (the watchdog has its own session).
        proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        landed = len(list(out.glob("*.parquet")))
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert 1 <= landed < shards // 2, f"{landed} of {shards} files when the first appeared: output did not stream"

    # Ray's agents would wait a minute on the dead GCS; the watchdog ends them at once.
    deadline = time.monotonic() + 30
    while _live_processes_in_group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _live_processes_in_group(proc.pid) == [], "the killed driver's local Ray outlived it"

    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.parquet")}
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{len(before)} already written, {shards - len(before)} to do" in rerun.stdout
    after = {p.name: p for p in out.glob("*.parquet")}
    assert all((after[name].stat().st_mtime_ns, after[name].read_bytes()) == kept for name, kept in before.items())
    keys = [(t["shard_id"][0].as_py(), k) for t in read_output(out).values() for k in t["key"].to_pylist()]
    assert len(keys) == len(set(keys)) == shards * per_shard


def test_bad_files_become_error_rows_and_the_job_goes_on(models, tmp_path, ray_local):
    corpus = write_bad_image_corpus(tmp_path / "raw")
    (tmp_path / "in").mkdir()
    expected = {}  # key -> expected error substring, None for an image that must decode
    for name, outcome in corpus.items():
        (tmp_path / "raw" / name).rename(tmp_path / "in" / name)  # keyed by file name: a.jpg and a.png are two
        expected[name] = outcome
    # Files that are not images are skipped and listed, not error rows; hidden files are tool litter, skipped too.
    (tmp_path / "in" / "notes.md").write_text("# not an image")
    (tmp_path / "in" / ".DS_Store").write_bytes(b"\0" * 16)
    config = config_for(models, str(tmp_path / "in"), f"{tmp_path}/out", "output.max_error_fraction=1")
    summary = run_job(config, log=lambda *_: None)
    rows = {r["key"]: r for t in read_output(f"{tmp_path}/out").values() for r in t.to_pylist()}
    assert sorted(rows) == sorted(expected)
    for key, outcome in expected.items():
        row = rows[key]
        if outcome is None:
            assert row["error"] is None and row["text"] is not None, key
        else:
            assert outcome in row["error"] and row["stop_reason"] == "error" and row["text"] is None, key
    assert summary.errors == sum(o is not None for o in expected.values())
    # Each error row names its kind first; the manifest groups the rows by it.
    kinds = {
        key: "image_too_large" if key.startswith("bomb") else "image_unreadable"
        for key, outcome in expected.items()
        if outcome is not None
    }
    assert {key: kind_of(rows[key]["error"]) for key in kinds} == kinds
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["summary"]["error_breakdown"] == dict(Counter(kinds.values()))
    assert manifest["skipped_files"] == {"count": 2, "files": [".DS_Store", "notes.md"]}

    strict = config_for(models, str(tmp_path / "in"), f"{tmp_path}/out", "output.max_error_fraction=0.1")
    with pytest.raises(JobFailed, match="max_error_fraction"):
        run_job(strict, log=lambda *_: None)


def test_unreadable_and_truncated_shards_fail_by_name_and_a_rerun_after_the_fix_completes_them(
    models, tmp_path, ray_local
):
    write_webdataset_shards(str(tmp_path / "in"), seed=SEED, num_shards=3, per_shard=PER_SHARD)
    whole = (tmp_path / "in" / "00001.tar").read_bytes()
    (tmp_path / "in" / "00001.tar").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "in" / "00002.tar").write_bytes(b"this is not a tar archive" * 40)
    config = config_for(models, f"{tmp_path}/in/*.tar", f"{tmp_path}/out")
    summaries = []
    with pytest.raises(JobFailed) as failed:
        run_job(config, log=summaries.append)
    message = str(failed.value)
    assert "2 shard(s) could not be finished" in message and "run the same command again" in message
    assert "00001: cannot read webdataset shard" in message and "00002: cannot read webdataset shard" in message

    # Every other shard is written; the lost samples are not error rows, and the cut shard is not done.
    assert sorted(read_output(f"{tmp_path}/out")) == ["00000.parquet"]
    table = summaries[-2]  # the summary table, then the line naming the output
    assert "1 written now, 0 already done, 2 failed" in table and "errors                  0" in table
    assert summaries[-1].startswith(f"output: {tmp_path}/out")
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert sorted(manifest["failed_shards"]) == ["00001", "00002"]
    kept = pq.read_table(tmp_path / "out" / "_partial" / "00001.parquet").to_pylist()
    assert 0 < len(kept) < PER_SHARD and all(r["error"] is None and r["text"] for r in kept)
    assert f"after {len(kept)} records" in manifest["failed_shards"]["00001"]

    write_webdataset_shards(str(tmp_path / "in"), seed=SEED, num_shards=3, per_shard=PER_SHARD)  # the source fixed
    summary = run_job(config, log=lambda *_: None)
    assert (summary.shards_skipped, summary.shards_written, summary.shards_failed) == (1, 2, 0)
    keys = [k for t in read_output(f"{tmp_path}/out").values() for k in t["key"].to_pylist()]
    assert len(keys) == len(set(keys)) == 3 * PER_SHARD
    assert not (tmp_path / "out" / "_partial" / "00001.parquet").exists()
    assert json.loads((tmp_path / "out" / "_manifest.json").read_text())["failed_shards"] == {}


@pytest.mark.parametrize(
    "override,field",
    [
        ("decode.max_new_tokenz=3", "decode.max_new_tokenz: unknown field"),
        ("decode.max_new_tokens=many", "decode.max_new_tokens"),
        ("compute.torch_threads=0", "compute.torch_threads"),
        ("model.target=/no/such/model", "model.target"),
        ("input.uri=/no/such/shards/*.tar", "input.uri"),
        ("input.uri=nosuchproto://x", "input.uri: unknown protocol 'nosuchproto'"),
        ("decode.max_new_tokens=[1", "--set decode.max_new_tokens: '[1' is not a valid YAML value"),
        ("input.storage_options.secret=hunter2", "looks like a credential"),
    ],
)
def test_config_errors_name_the_field_before_ray_starts(models, tmp_path, monkeypatch, override, field):
    monkeypatch.setattr(job_module, "init_ray", lambda config: pytest.fail("Ray started despite a bad config"))
    write_webdataset_shards(str(tmp_path / "in"), seed=SEED, num_shards=1, per_shard=1)
    with pytest.raises(ConfigError) as error:
        run_job(config_for(models, f"{tmp_path}/in", f"{tmp_path}/out", override), log=lambda *_: None)
    assert field in str(error.value) and "hunter2" not in str(error.value)


@pytest.mark.parametrize("kind", ["vqa", "mc"])
def test_a_task_field_missing_from_every_record_fails_before_ray_starts(models, tmp_path, monkeypatch, kind):
    """Images alone carry no question: every row would be an error row, so the job stops at preflight instead."""
    monkeypatch.setattr(job_module, "init_ray", lambda config: pytest.fail("Ray started despite a missing field"))
    _write_image_folder(fsspec.filesystem("file", auto_mkdir=True), f"{tmp_path}/in")
    with pytest.raises(ConfigError) as error:
        run_job(config_for(models, str(tmp_path / "in"), f"{tmp_path}/out", f"task.kind={kind}"), log=lambda *_: None)
    message = str(error.value)
    assert message.startswith(f"task.kind={kind}: none of the first 5 records of shard images-")
    assert f"task {kind!r} needs a question" in message and "input.fields" in message


def test_a_parquet_image_column_that_is_not_there_fails_before_ray_starts(models, tmp_path, monkeypatch):
    monkeypatch.setattr(job_module, "init_ray", lambda *_: pytest.fail("Ray started despite a wrong column"))
    write_parquet_shards(str(tmp_path / "in"), seed=SEED, num_shards=1, per_shard=2)
    table = pq.read_table(tmp_path / "in" / "00000.parquet")
    pq.write_table(
        table.rename_columns(["picture" if n == "image" else n for n in table.column_names]),
        tmp_path / "in" / "00000.parquet",
    )
    with pytest.raises(ConfigError) as error:
        run_job(config_for(models, f"{tmp_path}/in", f"{tmp_path}/out"), log=lambda *_: None)
    message = str(error.value)
    assert message.startswith("input.image_column: ") and "has no image column 'image'" in message
    assert f"its columns are {', '.join(['picture' if n == 'image' else n for n in table.column_names])}" in message


def _shard_files_by_key(out: Path) -> dict[str, str]:
    """key -> the name of the output file holding its row."""
    return {key: name for name, table in read_output(str(out)).items() for key in table["key"].to_pylist()}


def test_retry_errors_redoes_only_the_shards_holding_error_rows(models, tmp_path, ray_local):
    _write_image_folder(fsspec.filesystem("file", auto_mkdir=True), f"{tmp_path}/in")  # img0 ... img4, in shards of 2
    make_scene(SEED, 3, image_size=128).image.save(tmp_path / "in" / "img3.png")  # over the first run's max_pixels
    config = config_for(models, str(tmp_path / "in"), f"{tmp_path}/out", "input.files_per_shard=2")
    small = config.model_copy(update={"compute": config.compute.model_copy(update={"max_pixels": 64 * 64})})
    with pytest.raises(JobFailed, match="run the same command with --retry-errors"):
        run_job(small, log=lambda *_: None)
    files = _shard_files_by_key(tmp_path / "out")
    first = (tmp_path / "out" / files["img0.png"]).stat().st_mtime_ns

    # The limit raised (compute settings do not shape the text, so the output resumes), the data unchanged: a plain
    # rerun keeps the finished shards, error rows and all.
    with pytest.raises(JobFailed):
        run_job(config, log=lambda *_: None)
    lines = []
    summary = run_job(config, log=lines.append, retry_errors=True)
    assert lines[0] == "3 shards, 3 already written (1 with error rows, redone), 1 to do"
    assert (summary.shards_skipped, summary.shards_written, summary.errors, summary.rows) == (2, 1, 0, 5)
    assert (tmp_path / "out" / files["img0.png"]).stat().st_mtime_ns == first  # not redone
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    redone = files["img3.png"][: -len(".parquet")]
    assert manifest["summary"]["errors"] == 0 and manifest["shards_written_this_run"] == {redone: 2}


def test_image_folder_rerun_after_changes_holds_every_image_once(models, tmp_path, ray_local):
    """Images added, one replaced, one removed, clutter beside them, and files_per_shard changed between runs: the
    second run decodes only what changed, and the output holds each image of the folder once, as it is now."""
    fs = fsspec.filesystem("file", auto_mkdir=True)
    _write_image_folder(fs, f"{tmp_path}/in")  # img0 ... img4 with captions
    (tmp_path / "in" / "Thumbs.db").write_bytes(b"\0\0")
    run_job(config_for(models, str(tmp_path / "in"), f"{tmp_path}/out", "input.files_per_shard=2"), log=lambda *_: None)
    files = _shard_files_by_key(tmp_path / "out")

    make_scene(SEED, 7).image.save(tmp_path / "in" / "img1.png")  # replaced: its shard (img0, img1) is redone
    (tmp_path / "in" / "img4.png").unlink()  # removed: its shard (img4 alone) goes, its caption is skipped
    for i in (5, 6):
        make_scene(SEED, i).image.save(tmp_path / "in" / f"img{i}.png")
    lines = []
    summary = run_job(
        config_for(models, str(tmp_path / "in"), f"{tmp_path}/out", "input.files_per_shard=3"), log=lines.append
    )
    keys = sorted(key for table in read_output(f"{tmp_path}/out").values() for key in table["key"].to_pylist())
    assert keys == ["img0.png", "img1.png", "img2.png", "img3.png", "img5.png", "img6.png"]
    assert (summary.shards_skipped, summary.shards_written, summary.rows) == (1, 2, 6)  # (img2, img3) kept
    assert _shard_files_by_key(tmp_path / "out")["img2.png"] == files["img2.png"]
    superseded = {files["img0.png"][:-8], files["img4.png"][:-8]}
    assert (
        lines[1]
        == "2 files skipped as not images (Thumbs.db, img4.txt; all are listed under skipped_files in "
        + f"{tmp_path}/out/_manifest.json)"
    )
    assert lines[2].startswith("2 shards written by an earlier run no longer match the folder")
    assert {p.stem for p in (tmp_path / "out" / "_superseded").glob("*.parquet")} == superseded
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert set(manifest["shards_superseded_this_run"]) == superseded
    assert manifest["skipped_files"] == {"count": 2, "files": ["Thumbs.db", "img4.txt"]}
    assert sorted(manifest["shard_identities"]) == sorted(f[:-8] for f in read_output(f"{tmp_path}/out"))


def _draft_checkpoint(family, models, root: Path, which: str) -> Path:
    """A draft checkpoint for the preflight checks: only its config.json and file listing are read."""
    path = root / which
    if which == "text":
        family.drafts["text_copy"].save_pretrained(path)
    elif which == "other_vocabulary":
        other = build_tokenizer(["completely different words for another tokenizer"] * 3, vocab_size=300)
        build_text_lm(other).save_pretrained(path)
    else:  # a VLM draft whose vision tower cuts the image into other patches than the target's
        path.mkdir()
        config = json.loads((models / "draft" / "config.json").read_text())
        config["vision_config"]["patch_size"] *= 2
        (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    "kind,which,message",
    [
        ("text", None, "is a vision-language model (llava), not a text-only LM; set draft.kind=vlm"),
        ("vlm", "text", "is a text-only model (llama), not a vision-language model; set draft.kind=text"),
        ("text", "other_vocabulary", "tokens, the target 261: it was built on another tokenizer"),
        ("vlm", "other_image", "does not read images like the target (vision_config.patch_size differ)"),
    ],
)
def test_preflight_refuses_a_draft_of_another_kind_or_vocabulary_before_ray_starts(
    family, models, tmp_path, monkeypatch, kind, which, message
):
    monkeypatch.setattr(job_module, "init_ray", lambda config: pytest.fail("Ray started despite a bad draft"))
    write_webdataset_shards(str(tmp_path / "in"), seed=SEED, num_shards=1, per_shard=1)
    draft = models / "draft" if which is None else _draft_checkpoint(family, models, tmp_path, which)
    config = config_for(models, f"{tmp_path}/in", f"{tmp_path}/out", f"draft.kind={kind}", f"draft.path={draft}")
    with pytest.raises(ConfigError) as error:
        run_job(config, log=lambda *_: None)
    assert str(error.value).startswith("draft.kind / draft.path: ") and message in str(error.value)


@pytest.mark.parametrize(
    "override,message",
    [
        ("compute.batch_size=0", "compute.batch_size: must be 'auto' or >= 1"),
        ("decode.max_new_tokens=[1", "--set decode.max_new_tokens: '[1' is not a valid YAML value"),
        ("input.uri=nosuchproto://x", "input.uri: unknown protocol 'nosuchproto'"),
    ],
)
def test_cli_reports_config_errors_with_exit_code_2_and_no_traceback(override, message):
    result = subprocess.run(
        [sys.executable, "-m", "jobs.caption", "--set", override], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
