"""Faults lose nothing: a crashed decode actor, throttling object storage, oversized images."""

import os
import subprocess
import sys

import pytest
import s3fs

from pipeline.job import run_job
from specvlm.demo.shards import write_webdataset_shards
from tests.test_pipeline import PER_SHARD, SEED, check_against_inputs, config_for, read_output

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


def test_throttling_object_storage_is_retried_and_output_is_complete(
    family, models, s3_bucket, flaky_s3_endpoint, ray_local
):
    bucket, _ = s3_bucket
    url, proxy = flaky_s3_endpoint
    write_webdataset_shards(
        f"s3://{bucket}/in", seed=SEED, num_shards=3, per_shard=PER_SHARD, storage_options={"endpoint_url": url}
    )
    config = config_for(models, f"s3://{bucket}/in/*.tar", f"s3://{bucket}/out", endpoint=url)
    summary = run_job(config, log=lambda *_: None)
    assert proxy.failed > 10, "the proxy should have refused many requests"
    assert summary.errors == 0
    s3fs.S3FileSystem.clear_instance_cache()
    check_against_inputs(family, read_output(f"s3://{bucket}/out", url), f"s3://{bucket}/in/*.tar", url)


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
