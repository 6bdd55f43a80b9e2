"""Faults lose nothing: a crashed decode actor, object storage that resets, cuts, delays and fails (moto behind
the fault proxy), endpoints that refuse or never answer, oversized images."""

import json
import os
import subprocess
import sys
import time

import pytest
import s3fs

from pipeline.job import JobFailed, run_job
from pipeline.sink import MANIFEST
from specvlm.demo.shards import write_webdataset_shards
from tests.test_pipeline import (
    PER_SHARD,
    SCHEDULE_COLUMNS,
    SEED,
    check_against_inputs,
    config_for,
    job_command,
    read_output,
)

JOB = [sys.executable, "-m", "jobs.caption", "--config", os.devnull]


def test_crashed_decode_actor_is_restarted_and_every_row_is_written_once(models, tmp_path):
    write_webdataset_shards(str(tmp_path / "in"), seed=SEED, num_shards=4, per_shard=PER_SHARD)
    marker = tmp_path / "crashed"
    args = JOB + [
        f"--set=input.uri={tmp_path}/in",
        f"--set=output.uri={tmp_path}/out",
        f"--set=model.target={models / 'target'}",
        "--set=draft.kind=vlm",
        f"--set=draft.path={models / 'draft'}",
        "--set=decode.max_new_tokens=8",
        "--set=compute.batch_size=2",
        "--set=ray.num_cpus=2",
        "--set=output.max_error_fraction=0",
    ]
    # Its own local Ray, so the fault variable reaches the workers' environment.
    env = {**os.environ, "RAY_ADDRESS": "", "SPECVLM_FAULTS": f"decode_exit_once:{marker}"}
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert marker.exists(), "the fault never fired: the test proves nothing"
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [r for t in read_output(f"{tmp_path}/out").values() for r in t.to_pylist()]
    assert len(rows) == len({(r["shard_id"], r["key"]) for r in rows}) == 4 * PER_SHARD
    assert all(r["error"] is None for r in rows)


def _s3_job(models, bucket, endpoint, *extra):
    return config_for(models, f"s3://{bucket}/in/*.tar", f"s3://{bucket}/out", *extra, endpoint=endpoint)


def _rows(bucket, endpoint) -> dict:
    """(shard, key) -> the row, without the columns that follow measured timings and so differ between runs."""
    s3fs.S3FileSystem.clear_instance_cache()
    tables = read_output(f"s3://{bucket}/out", endpoint)
    varying = ["latency_s", "tokens_per_s", *SCHEDULE_COLUMNS]
    rows = [r for t in tables.values() for r in t.drop(varying).to_pylist()]
    keyed = {(r["shard_id"], r["key"]): r for r in rows}
    assert len(keyed) == len(rows), "a row was written twice"
    return keyed


def test_random_faults_on_a_quarter_of_connections_change_nothing_in_the_output(
    family, models, s3_bucket, s3_endpoint, fault_proxy, ray_local, tmp_path
):
    bucket, _ = s3_bucket
    write_webdataset_shards(
        f"s3://{bucket}/in", seed=SEED, num_shards=3, per_shard=PER_SHARD, storage_options={"endpoint_url": s3_endpoint}
    )
    run_job(_s3_job(models, bucket, s3_endpoint), log=lambda *_: None)
    fault_free = _rows(bucket, s3_endpoint)
    s3fs.S3FileSystem(endpoint_url=s3_endpoint).rm(f"{bucket}/out", recursive=True)

    fault_proxy.fault_rate = 0.25  # resets, replies cut mid-body, delays; on reads and writes alike
    summary = run_job(_s3_job(models, bucket, fault_proxy.url), log=lambda *_: None)
    assert sum(fault_proxy.injected.values()) >= 5, f"too few faults to prove anything: {fault_proxy.injected}"
    assert summary.shards_written == 3 and summary.errors == 0
    assert _rows(bucket, s3_endpoint) == fault_free
    check_against_inputs(family, read_output(f"s3://{bucket}/out", s3_endpoint), f"s3://{bucket}/in/*.tar", s3_endpoint)


def test_a_short_outage_of_one_object_is_absorbed(family, models, s3_bucket, s3_endpoint, fault_proxy, ray_local):
    bucket, _ = s3_bucket
    write_webdataset_shards(
        f"s3://{bucket}/in", seed=SEED, num_shards=3, per_shard=PER_SHARD, storage_options={"endpoint_url": s3_endpoint}
    )
    fault_proxy.outage(f"{bucket}/in/00001.tar", requests=15)
    summary = run_job(_s3_job(models, bucket, fault_proxy.url), log=lambda *_: None)
    assert fault_proxy.injected["outage"] == 15
    assert (summary.shards_written, summary.shards_failed, summary.errors) == (3, 0, 0)
    check_against_inputs(family, read_output(f"s3://{bucket}/out", s3_endpoint), f"s3://{bucket}/in/*.tar", s3_endpoint)


def test_a_lasting_outage_fails_only_its_shard_and_a_rerun_after_it_finishes_the_job(
    family, models, s3_bucket, s3_endpoint, fault_proxy, ray_local
):
    bucket, _ = s3_bucket
    write_webdataset_shards(
        f"s3://{bucket}/in", seed=SEED, num_shards=3, per_shard=PER_SHARD, storage_options={"endpoint_url": s3_endpoint}
    )
    fault_proxy.outage(f"{bucket}/in/00001.tar")
    config = _s3_job(models, bucket, fault_proxy.url, "input.retry_for_s=3")
    with pytest.raises(JobFailed, match=r"00001: cannot read webdataset shard .* Service Unavailable") as failed:
        run_job(config, log=lambda *_: None)
    assert "1 shard(s) could not be finished" in str(failed.value)
    assert sorted(read_output(f"s3://{bucket}/out", s3_endpoint)) == ["00000.parquet", "00002.parquet"]
    manifest = json.loads(s3fs.S3FileSystem(endpoint_url=s3_endpoint).cat(f"{bucket}/out/_manifest.json"))
    assert list(manifest["failed_shards"]) == ["00001"]

    fault_proxy.heal()
    summary = run_job(config, log=lambda *_: None)
    assert (summary.shards_skipped, summary.shards_written, summary.shards_failed) == (2, 1, 0)
    check_against_inputs(family, read_output(f"s3://{bucket}/out", s3_endpoint), f"s3://{bucket}/in/*.tar", s3_endpoint)


@pytest.mark.parametrize("endpoint", ["silent_endpoint", "refusing_endpoint"])
@pytest.mark.parametrize("section", ["input", "output"])
def test_an_endpoint_that_never_answers_or_refuses_fails_preflight_with_exit_2(
    models, tmp_path, request, endpoint, section
):
    url = request.getfixturevalue(endpoint)
    write_webdataset_shards(str(tmp_path / "in"), seed=SEED, num_shards=1, per_shard=1)
    where = {"input": f"{tmp_path}/in", "output": f"{tmp_path}/out", section: "s3://bucket/data"}
    args = job_command(models, where["input"], where["output"], f"{section}.storage_options.endpoint_url={url}")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "RAY_ADDRESS": ""}
    started = time.monotonic()
    # The timeout only guards against a hang: before preflight had bounded waits this took minutes.
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{section}.uri" in result.stderr and f"{section}.storage_options.endpoint_url" in result.stderr
    assert "Traceback" not in result.stderr, f"after {seconds:.1f} s: {result.stderr[-3000:]}"


@pytest.mark.parametrize("max_pixels,expect_error", [(10_000, False), (1_000, True)])
def test_pixel_limit_refuses_large_images_before_decoding(models, tmp_path, ray_local, max_pixels, expect_error):
    write_webdataset_shards(str(tmp_path / "in"), seed=SEED, num_shards=1, per_shard=2)  # 64x64 = 4096 pixels
    config = config_for(
        models, f"{tmp_path}/in", f"{tmp_path}/out", f"compute.max_pixels={max_pixels}", "output.max_error_fraction=1"
    )
    run_job(config, log=lambda *_: None)
    errors = [r["error"] for t in read_output(f"{tmp_path}/out").values() for r in t.to_pylist()]
    assert len(errors) == 2
    assert all((e is not None and "max_pixels" in e) if expect_error else e is None for e in errors)


def test_a_read_that_drips_is_cut_and_its_shard_named_while_the_other_shards_land(
    models, s3_bucket, s3_endpoint, fault_proxy, ray_local
):
    bucket, _ = s3_bucket
    options = {"endpoint_url": s3_endpoint}
    write_webdataset_shards(f"s3://{bucket}/in", seed=SEED, num_shards=4, per_shard=PER_SHARD, storage_options=options)
    fault_proxy.drip(f"{bucket}/in/00001.tar", bytes_per_s=5)  # never 15 s between bytes: no read timeout fires
    config = _s3_job(models, bucket, fault_proxy.url, "input.request_deadline_s=20", "input.retry_for_s=1")
    started = time.monotonic()
    with pytest.raises(JobFailed, match=r"00001: cannot read webdataset shard") as failed:
        run_job(config, log=lambda *_: None)
    assert time.monotonic() - started < 120, "the dripping read was not cut"  # the tar at 5 B/s: an hour
    assert "Timeout" in str(failed.value) and fault_proxy.injected["drip"] >= 1
    landed = read_output(f"s3://{bucket}/out", s3_endpoint)
    assert sorted(landed) == ["00000.parquet", "00002.parquet", "00003.parquet"]
    # The shards after it were read while the drip held its read: one stuck read task does not stall the others.
    read_at = {path: at for at, method, path in fault_proxy.requests if method == "GET" and path.endswith(".tar")}
    # (Half the deadline after the drip began: the proxy notices the cut only at its next byte.)
    drip_began = read_at[f"/{bucket}/in/00001.tar"]
    assert max(read_at[f"/{bucket}/in/{name}.tar"] for name in ("00002", "00003")) < drip_began + 10


def test_a_manifest_that_cannot_be_written_fails_the_job_after_its_summary_and_a_rerun_writes_it(
    family, models, s3_bucket, s3_endpoint, fault_proxy, ray_local
):
    bucket, _ = s3_bucket
    options = {"endpoint_url": s3_endpoint}
    write_webdataset_shards(f"s3://{bucket}/in", seed=SEED, num_shards=2, per_shard=PER_SHARD, storage_options=options)
    # Every request that puts the manifest in place (its copy from _staging/) is reset, for as long as the job asks;
    # the shard files and the manifest's staging upload go through.
    fault_proxy.resets("PUT", f"/{bucket}/out/{MANIFEST}")
    config = _s3_job(models, bucket, fault_proxy.url, "output.retry_for_s=1")
    logged = []
    with pytest.raises(JobFailed) as failed:
        run_job(config, log=logged.append)
    assert fault_proxy.injected["reset_burst"] > 0
    message = str(failed.value)
    assert f"manifest could not be written to s3://{bucket}/out/{MANIFEST}" in message
    assert "output.retry_for_s=1 s" in message and "run the same command again" in message
    assert "The 2 shard file(s) this run wrote are complete" in message
    assert any("block efficiency (tau)" in line for line in logged), "no summary before the failure"
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    assert not fs.exists(f"{bucket}/out/{MANIFEST}")
    assert sorted(read_output(f"s3://{bucket}/out", s3_endpoint)) == ["00000.parquet", "00001.parquet"]

    fault_proxy.heal()
    summary = run_job(config, log=lambda *_: None)
    assert (summary.shards_skipped, summary.shards_written, summary.shards_failed) == (2, 0, 0)
    fs.invalidate_cache()
    assert json.loads(fs.cat(f"{bucket}/out/{MANIFEST}"))["summary"]["shards_skipped"] == 2
    check_against_inputs(family, read_output(f"s3://{bucket}/out", s3_endpoint), f"s3://{bucket}/in/*.tar", s3_endpoint)
