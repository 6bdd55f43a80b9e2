"""Preflight against a store that drops connections for a moment (moto behind the fault proxy): a short burst of
resets on any request preflight makes is retried like a job's reads and writes, and only a fault that lasts past
preflight's short retry ends the job with exit 2, naming the config field."""

import os
import subprocess
import time

import pytest

from pipeline.config import ConfigError
from pipeline.job import preflight, run_job
from specvlm.data.retry import PREFLIGHT_RETRY_S, S3_PREFLIGHT_SETTINGS
from specvlm.demo.shards import write_webdataset_shards
from tests.fixtures_s3 import upload_models
from tests.test_pipeline import PER_SHARD, SEED, check_against_inputs, config_for, job_command, read_output

# Every kind of request preflight makes of the store, as (method, a fragment of the request's target). s3fs lists
# with ListObjectsV2; the output's write probe asks once about the output folder (HEAD), then writes its probe
# object (PutObject) and removes it (DeleteObjects, a POST to ?delete).
PREFLIGHT_REQUESTS = {
    "listing": ("GET", "list-type=2"),
    "probe's HEAD": ("HEAD", "/out"),
    "probe's PutObject": ("PUT", "/out/_write_probe-"),
    "probe's DeleteObjects": ("POST", "?delete"),
}
ATTEMPTS = S3_PREFLIGHT_SETTINGS["retries"]["total_max_attempts"]  # botocore's own, per request, at preflight
# Resets in a row: more than the client absorbs on its own, botocore's attempts each of which aiohttp resends once
# where the request is idempotent (GET, HEAD, PUT; DeleteObjects is a POST, which gave up after ATTEMPTS resets).
BURST = 2 * ATTEMPTS


def _s3_config(models, bucket, endpoint, *extra):
    return config_for(models, f"s3://{bucket}/in/*.tar", f"s3://{bucket}/out", *extra, endpoint=endpoint)


def _write_input(bucket, endpoint, num_shards):
    options = {"endpoint_url": endpoint}
    write_webdataset_shards(
        f"s3://{bucket}/in", seed=SEED, num_shards=num_shards, per_shard=PER_SHARD, storage_options=options
    )


def _asked(fault_proxy, method, fragment) -> int:
    return sum(1 for _, m, target in fault_proxy.requests if m == method and fragment in target)


@pytest.mark.parametrize("kind", PREFLIGHT_REQUESTS)
def test_a_burst_of_resets_on_one_preflight_request_kind_is_retried(models, s3_bucket, s3_endpoint, fault_proxy, kind):
    bucket, _ = s3_bucket
    _write_input(bucket, s3_endpoint, num_shards=2)
    method, fragment = PREFLIGHT_REQUESTS[kind]
    fault_proxy.resets(method, fragment, requests=BURST)
    _, plan, _ = preflight(_s3_config(models, bucket, fault_proxy.url))
    assert fault_proxy.injected["reset_burst"] == BURST, f"the burst never hit a {kind}: the test proves nothing"
    assert _asked(fault_proxy, method, fragment) > BURST  # asked again after the burst
    assert [s.shard_id for s in plan.shards] == ["00000", "00001"]


def test_a_job_whose_every_preflight_request_kind_meets_a_reset_burst_writes_every_row_once(
    family, models, s3_bucket, s3_endpoint, fault_proxy, ray_local
):
    bucket, _ = s3_bucket
    _write_input(bucket, s3_endpoint, num_shards=2)
    for method, fragment in PREFLIGHT_REQUESTS.values():
        fault_proxy.resets(method, fragment, requests=BURST)
    summary = run_job(_s3_config(models, bucket, fault_proxy.url), log=lambda *_: None)
    assert fault_proxy.injected["reset_burst"] == BURST * len(PREFLIGHT_REQUESTS)
    assert (summary.shards_written, summary.shards_failed, summary.errors) == (2, 0, 0)
    check_against_inputs(family, read_output(f"s3://{bucket}/out", s3_endpoint), f"s3://{bucket}/in/*.tar", s3_endpoint)


@pytest.mark.parametrize("kind,section", [("listing", "input"), ("probe's DeleteObjects", "output")])
def test_resets_that_last_past_preflights_retry_end_the_job_with_exit_2_in_bounded_time(
    models, s3_bucket, s3_endpoint, fault_proxy, kind, section
):
    bucket, _ = s3_bucket
    _write_input(bucket, s3_endpoint, num_shards=1)
    method, fragment = PREFLIGHT_REQUESTS[kind]
    fault_proxy.resets(method, fragment)  # every one of them, for as long as the job asks
    endpoint = f"storage_options.endpoint_url={fault_proxy.url}"
    args = job_command(
        models, f"s3://{bucket}/in/*.tar", f"s3://{bucket}/out", f"input.{endpoint}", f"output.{endpoint}"
    )
    env = {**os.environ, "RAY_ADDRESS": ""}
    started = time.monotonic()
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180)
    seconds = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{section}.uri" in result.stderr and f"{section}.storage_options.endpoint_url" in result.stderr
    assert "did not answer in time or refused the connection" in result.stderr
    assert fault_proxy.injected["reset_burst"] > ATTEMPTS  # retried past botocore's own attempts
    # The process's start (Python, torch) plus preflight's retry, never a job's whole output.retry_for_s (60 s).
    assert seconds < 50, f"{seconds:.1f} s: {result.stderr[-3000:]}"


def test_preflight_retries_no_longer_than_the_sections_retry_for_s(models, s3_bucket, s3_endpoint, fault_proxy):
    bucket, _ = s3_bucket
    _write_input(bucket, s3_endpoint, num_shards=1)
    fault_proxy.resets(*PREFLIGHT_REQUESTS["probe's DeleteObjects"])
    config = _s3_config(models, bucket, fault_proxy.url, "output.retry_for_s=0")
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"output\.uri: the store holding .* did not answer"):
        preflight(config)
    assert time.monotonic() - started < PREFLIGHT_RETRY_S
    assert fault_proxy.injected["reset_burst"] == ATTEMPTS  # botocore's own attempts, and no retry around them


def test_a_burst_of_resets_on_reading_a_model_from_the_store_is_retried(
    models, s3_bucket, s3_endpoint, fault_proxy, tmp_path
):
    bucket, options = s3_bucket
    upload_models(models, bucket, options)
    write_webdataset_shards(str(tmp_path / "in"), seed=SEED, num_shards=1, per_shard=PER_SHARD)
    config = config_for(
        models,
        f"{tmp_path}/in",
        f"{tmp_path}/out",
        f"model.target=s3://{bucket}/models/target",
        f"draft.path=s3://{bucket}/models/draft",
        f"model.storage_options.endpoint_url={fault_proxy.url}",
    )
    fault_proxy.resets("GET", f"/{bucket}/models/target/config.json", requests=BURST)
    _, plan, _ = preflight(config)
    assert fault_proxy.injected["reset_burst"] == BURST
    assert [s.shard_id for s in plan.shards] == ["00000"]
