"""The Ray Data pipeline end to end: shards in (local and a real S3 endpoint) -> Parquet out, checked row by row."""

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys

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
from specvlm.data.images import decode_image
from specvlm.data.prompts import format_choices
from specvlm.data.sources import list_shards, read_shard
from specvlm.demo.shards import write_parquet_shards, write_webdataset_shards
from specvlm.demo.world import make_scene
from specvlm.specdec.requests import Request
from tests.badfiles import write_bad_image_corpus

MAX_NEW = 10
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
        "draft.gamma=3",
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
            assert (row["shard_id"], row["source"], row["task"]) == (shard.shard_id, shard.uri, "caption")
            assert row["output_ids"] == expected_tokens(family, record, row["prompt"])
            assert row["text"] == family.tokenizer.decode(row["output_ids"], skip_special_tokens=True).strip()
            assert row["new_tokens"] == len(row["output_ids"]) == sum(row["accepted_per_step"]) + row["target_calls"]
            assert row["block_efficiency"] == pytest.approx(row["new_tokens"] / row["target_calls"])
            assert row["draft"].startswith("vlm-chain:") and len(row["config_hash"]) == 16
            assert row["reference"] == record["caption"]


def test_caption_job_on_local_webdataset_matches_target_greedy(family, models, tmp_path, ray_local):
    write_webdataset_shards(str(tmp_path / "in"), seed=SEED, num_shards=SHARDS, per_shard=PER_SHARD)
    config = config_for(models, f"{tmp_path}/in/*.tar", f"{tmp_path}/out")
    summary = run_job(config, log=lambda *_: None)
    assert (summary.rows, summary.errors, summary.shards_written) == (SHARDS * PER_SHARD, 0, SHARDS)
    assert 0 < summary.acceptance_rate < 1
    tables = read_output(f"{tmp_path}/out")
    check_against_inputs(family, tables, f"{tmp_path}/in/*.tar")
    assert (tmp_path / "out" / "_manifest.json").exists() and not (tmp_path / "out" / "_staging").exists()


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


def test_killed_job_then_rerun_writes_every_row_exactly_once(models, tmp_path):
    """The driver dies right after its first shard file lands; a rerun finishes, nothing lost or doubled.

    The death comes from a fault hook, not a timer, so it lands mid-run however fast the machine is."""
    write_webdataset_shards(str(tmp_path / "in"), seed=SEED, num_shards=12, per_shard=PER_SHARD)
    args = [
        sys.executable,
        "-m",
        "jobs.caption",
        "--config",
        os.devnull,
        f"--set=input.uri={tmp_path}/in",
        f"--set=output.uri={tmp_path}/out",
        f"--set=model.target={models / 'target'}",
        "--set=draft.kind=vlm",
        f"--set=draft.path={models / 'draft'}",
        "--set=decode.max_new_tokens=64",
        "--set=compute.batch_size=1",
        "--set=ray.num_cpus=2",
    ]
    env = {**os.environ, "RAY_ADDRESS": ""}  # its own local Ray, killed with it
    crash = {**env, "SPECVLM_FAULTS": f"shard_written_exit_once:{tmp_path / 'crashed'}"}
    proc = subprocess.Popen(
        args, env=crash, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        assert proc.wait(timeout=180) == 17, "the driver should die at the fault hook"
    finally:
        with contextlib.suppress(ProcessLookupError):  # the local Ray it started, left behind as by a real crash
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = len(list((tmp_path / "out").glob("*.parquet")))
    assert partial == 1

    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{partial} already written" in rerun.stdout
    keys = [k for t in read_output(f"{tmp_path}/out").values() for k in t.column("key").to_pylist()]
    assert len(keys) == len(set(keys)) == 12 * PER_SHARD


def test_bad_files_become_error_rows_and_the_job_goes_on(models, tmp_path, ray_local):
    corpus = write_bad_image_corpus(tmp_path / "raw")
    (tmp_path / "in").mkdir()
    expected = {}  # key -> expected error substring, None for an image that must decode
    for name, outcome in corpus.items():
        key = name.replace(".", "_")  # stems must be unique: truncated.jpg and truncated.png are two samples
        (tmp_path / "raw" / name).rename(tmp_path / "in" / f"{key}.{name.rsplit('.', 1)[1]}")
        expected[key] = outcome
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

    strict = config_for(models, str(tmp_path / "in"), f"{tmp_path}/out", "output.max_error_fraction=0.1")
    with pytest.raises(JobFailed, match="max_error_fraction"):
        run_job(strict, log=lambda *_: None)


def test_unreadable_and_truncated_shards_become_error_rows(models, tmp_path, ray_local):
    write_webdataset_shards(str(tmp_path / "in"), seed=SEED, num_shards=2, per_shard=PER_SHARD)
    (tmp_path / "in" / "00002.tar").write_bytes(b"this is not a tar archive" * 40)
    whole = (tmp_path / "in" / "00001.tar").read_bytes()
    (tmp_path / "in" / "00001.tar").write_bytes(whole[: len(whole) // 2])
    config = config_for(models, f"{tmp_path}/in/*.tar", f"{tmp_path}/out", "output.max_error_fraction=1")
    run_job(config, log=lambda *_: None)
    tables = read_output(f"{tmp_path}/out")
    assert tables["00000.parquet"].num_rows == PER_SHARD and tables["00000.parquet"]["error"].null_count == PER_SHARD
    broken = tables["00002.parquet"].to_pylist()
    assert [r["key"] for r in broken] == ["00002:__shard__"] and "cannot read webdataset shard" in broken[0]["error"]
    cut = tables["00001.parquet"].to_pylist()
    assert 0 < len(cut) - 1 < PER_SHARD and all(r["error"] is None for r in cut[:-1])
    assert cut[-1]["key"] == "00001:__truncated__" and cut[-1]["stop_reason"] == "error"


@pytest.mark.parametrize(
    "override,field",
    [
        ("decode.max_new_tokenz=3", "decode.max_new_tokenz: unknown field"),
        ("decode.max_new_tokens=many", "decode.max_new_tokens"),
        ("compute.torch_threads=0", "compute.torch_threads"),
        ("model.target=/no/such/model", "model.target"),
        ("input.uri=/no/such/shards/*.tar", "input.uri"),
        ("input.storage_options.secret=hunter2", "looks like a credential"),
    ],
)
def test_config_errors_name_the_field_before_ray_starts(models, tmp_path, monkeypatch, override, field):
    monkeypatch.setattr(job_module, "init_ray", lambda config: pytest.fail("Ray started despite a bad config"))
    write_webdataset_shards(str(tmp_path / "in"), seed=SEED, num_shards=1, per_shard=1)
    with pytest.raises(ConfigError) as error:
        run_job(config_for(models, f"{tmp_path}/in", f"{tmp_path}/out", override), log=lambda *_: None)
    assert field in str(error.value) and "hunter2" not in str(error.value)


def test_cli_reports_config_errors_with_exit_code_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "jobs.caption", "--set", "compute.batch_size=0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "compute.batch_size" in result.stderr and ">= 1" in result.stderr
