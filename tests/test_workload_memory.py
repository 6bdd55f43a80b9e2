"""The running batch fits its cache in memory on any workload: a slot's bytes come from the model, the slot budget
from the configured max_batch_tokens and the memory free, and rows that need many slots (long outputs, many image
tokens) get a smaller cap than short rows, at the job's default settings."""

import json

import pytest

from pipeline.config import ComputeConfig, load_config
from pipeline.job import run_job
from specvlm.demo.shards import write_webdataset_shards
from specvlm.specdec import autobatch, decode
from specvlm.specdec.autobatch import kv_bytes_per_slot, slot_budget
from specvlm.specdec.decode import DecodeConfig, SpeculativeDecoder


def engine(family, max_new_tokens, **config):
    """The engine at the job's defaults (rows found by measurement, the default slot budget), EOS ignored so that
    every output runs to its full length."""
    config = DecodeConfig(
        max_new_tokens=max_new_tokens,
        eos_token_ids=(),
        max_rows=None,
        max_batch_tokens=ComputeConfig().max_batch_tokens,
        **config,
    )
    return SpeculativeDecoder(family.target, family.draft("vlm_noisy", gamma=3), config)


def test_bytes_per_slot_are_what_the_cache_allocates(family):
    decoder = engine(family, 4)
    decoder.generate(family.requests(2))
    cache = decoder.state.target.cache
    allocated = sum(t.nbytes for t in cache.keys + cache.values)
    assert allocated == kv_bytes_per_slot(family.target) * cache.rows * cache.capacity


def test_free_memory_bounds_the_configured_budget():
    assert slot_budget(32768, 1024, 1 << 40) == 32768
    assert slot_budget(32768, 1024, 8 << 20) == int((8 << 20) * autobatch.KV_MEMORY_SHARE) // 1024
    assert slot_budget(None, 1024, 8 << 20) == slot_budget(32768, 1024, 8 << 20)


@pytest.fixture
def small_device(monkeypatch, family):
    """A device whose free memory holds 4,096 slots of the target and the draft: less than the default budget."""
    slots = 4096
    per_slot = 2 * kv_bytes_per_slot(family.target)  # the vlm draft is a copy of the target's shape
    monkeypatch.setattr(decode, "free_memory", lambda device: int(slots * per_slot / autobatch.KV_MEMORY_SHARE))
    return slots


def rows_seen(decoder, requests):
    """Runs the requests to the end; the running batch's largest row count, checking its cache fits the budget."""
    for request in requests:
        decoder.submit(request)
    results, most = {}, 0
    while decoder.busy:
        results.update(decoder.step())
        state = decoder.state
        assert state.rows * state.capacity <= decoder.max_batch_tokens
        most = max(most, state.n)
    return most, [results[i] for i in sorted(results)]


def test_long_outputs_get_a_smaller_cap_that_fits_and_the_job_completes(family, small_device):
    long = engine(family, 400)
    # The device's slots, less the share held for prefixes kept across admissions (decode.PREFIX_CACHE_SHARE).
    kept = small_device // decode.PREFIX_CACHE_SHARE if long.prefix_cache is not None else 0
    assert long.max_batch_tokens == small_device - kept and small_device < ComputeConfig().max_batch_tokens
    long_rows, results = rows_seen(long, family.requests(12))
    assert all(r.error is None and len(r.tokens) == 400 for r in results)
    short_rows, _ = rows_seen(engine(family, 24), family.requests(40))
    assert 1 < long_rows < short_rows


def test_a_job_at_default_settings_with_long_rows_completes_within_its_slot_budget(models, tmp_path, ray_local):
    """Rows of 1,500 new tokens through the whole job, every compute field at its default: the actor's running
    batch (its manifest operating point) holds fewer rows than short rows start with, and its cache fits."""
    write_webdataset_shards(str(tmp_path / "in"), seed=5, num_shards=1, per_shard=6)
    overrides = [
        f"input.uri={tmp_path}/in/*.tar",
        f"output.uri={tmp_path}/out",
        f"model.target={models / 'target'}",
        "draft.kind=vlm",
        f"draft.path={models / 'draft'}",
        "decode.max_new_tokens=1500",
    ]
    summary = run_job(load_config(None, overrides), log=lambda *_: None)
    assert (summary.rows, summary.errors) == (6, 0)
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    (point,) = manifest["operating_points"].values()
    budget = point["kv"]["slot_budget"]
    assert budget <= ComputeConfig().max_batch_tokens
    assert point["capacity"] > 1500 and point["rows"] * point["capacity"] <= budget
    assert point["rows"] < autobatch.START
