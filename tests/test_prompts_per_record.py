"""Several prompts per record (task.prompts): one output row per record and prompt, keyed by both, unique and
resumable; rows carry their image's content key, so the engine shares an image's prefill between them, and never
between two images that only share a name."""

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.job import run_job
from pipeline.schema import row_to_request
from pipeline.stages import Preparer
from specvlm.demo.shards import write_webdataset_shards
from tests.test_pipeline import MAX_NEW, config_for, expected_tokens, read_output

PROMPTS = {"short": "Describe the image in a few words.", "long": "Describe the image in detail."}
BASE = ["input.uri=x", "output.uri=o", "model.target=t"]


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def record(key: str, image: bytes, source: str = "shard.tar", row_index: int = 0, question: str | None = None):
    return {"key": key, "shard_id": "s", "source": source, "image": image, "question": question, "answer": None,
            "caption": None, "choices": None, "references": None, "meta": None, "error": None,
            "row_index": row_index, "is_end": False}  # fmt: skip


def preparer(family, *overrides):
    return Preparer(load_config(None, [*BASE, *overrides]), family.processor)


def test_each_prompt_gives_a_row_keyed_by_record_and_prompt_name(family):
    prepare = preparer(family, *(f"task.prompts.{name}={text}" for name, text in PROMPTS.items()))
    rows = prepare.rows(record("img7", png(0), row_index=10))
    assert [r["key"] for r in rows] == ["img7#short", "img7#long"]
    assert [r["row_index"] for r in rows] == [10, 11]
    assert all(r["error"] is None for r in rows)
    for row, text in zip(rows, PROMPTS.values()):
        assert text in row["prompt"]
    assert rows[0]["pixel_values"] == rows[1]["pixel_values"] and rows[0]["image_key"] == rows[1]["image_key"]
    assert rows[0]["seed"] != rows[1]["seed"]  # each prompt samples on its own
    end = prepare.rows({**record("", None, row_index=12), "is_end": True})
    assert len(end) == 1 and end[0]["row_index"] == 12


def test_vqa_prompts_place_the_records_question(family):
    prompts = ['task.prompts.plain="{question}"', 'task.prompts.brief="{question} Brief."']
    prepare = preparer(family, "task.kind=vqa", *prompts)
    rows = prepare.rows(record("q1", png(0), question="what colour is it?"))
    assert "what colour is it?" in rows[0]["prompt"] and "what colour is it? Brief." in rows[1]["prompt"]
    with pytest.raises(ConfigError, match=r"task.prompts: entry 'brief' of a vqa task must contain \{question\}"):
        load_config(None, [*BASE, "task.kind=vqa", "task.prompts.brief=Brief."])
    with pytest.raises(ConfigError, match=r"task\.prompts: prompt name 'a#b'"):
        load_config(None, [*BASE, "task.prompts.a#b=x"])


def test_an_image_is_keyed_by_its_content_never_its_name(family):
    prepare = preparer(family)
    same_name = [prepare(record("cat.jpg", png(seed))) for seed in (0, 1)]
    same_bytes = [prepare(record(name, png(2), source=f"{name}.tar")) for name in ("a.jpg", "b.jpg")]
    assert same_name[0]["image_key"] != same_name[1]["image_key"]
    assert same_bytes[0]["image_key"] == same_bytes[1]["image_key"]
    requests = [row_to_request(row) for row in same_name + same_bytes]
    assert [r.image_key for r in requests] == [row["image_key"] for row in same_name + same_bytes]


def test_two_images_under_one_name_decode_each_as_the_target_alone(family):
    """Same name, same question, other bytes: the engine must not give one the other's image prefill."""
    from specvlm.specdec.decode import DecodeConfig, SpeculativeDecoder

    prepare = preparer(family, "task.kind=vqa")
    rows = [prepare(record("cat.jpg", png(seed), question="what is this?")) for seed in (0, 1)]
    requests = [row_to_request(row) for row in rows]
    config = DecodeConfig(max_new_tokens=MAX_NEW, eos_token_ids=(family.tokenizer.eos_token_id,), adaptive=False)
    results = SpeculativeDecoder(family.target, None, config).generate(requests)
    assert [r.tokens for r in results] == [family.reference(r, MAX_NEW) for r in requests]
    assert results[0].tokens != results[1].tokens


def test_a_multi_prompt_job_writes_unique_keys_and_resumes_exactly(family, models, tmp_path, ray_local):
    write_webdataset_shards(str(tmp_path / "in"), seed=3, num_shards=2, per_shard=3)
    prompts = [f"task.prompts.{name}={text}" for name, text in PROMPTS.items()]
    config = config_for(models, f"{tmp_path}/in", f"{tmp_path}/out", *prompts)
    run_job(config, log=lambda *_: None)
    first = read_output(f"{tmp_path}/out")
    rows = [row for table in first.values() for row in table.to_pylist()]
    keys = [(row["shard_id"], row["key"]) for row in rows]
    assert len(rows) == 2 * 3 * len(PROMPTS) and len(set(keys)) == len(keys)
    assert {row["key"].rsplit("#", 1)[1] for row in rows} == set(PROMPTS)
    for row in rows:
        assert row["error"] is None
    # The rerun, with sharing off, writes the missing shard only, and the same rows: sharing changes no output.
    missing = sorted(first)[0]
    (tmp_path / "out" / missing).unlink()
    again = config_for(models, f"{tmp_path}/in", f"{tmp_path}/out", *prompts, "compute.share_image_prefill=false")
    summary = run_job(again, log=lambda *_: None)
    assert (summary.shards_skipped, summary.shards_written) == (1, 1)
    rewritten = read_output(f"{tmp_path}/out")[missing]
    columns = ["key", "prompt", "output_ids", "text"]
    assert rewritten.select(columns).to_pylist() == first[missing].select(columns).to_pylist()
    # And each row is the target's own greedy answer to its prompt.
    from specvlm.data.sources import list_shards, read_shard

    shard = next(s for s in list_shards(f"{tmp_path}/in") if f"{s.shard_id}.parquet" == missing)
    images = {r["key"]: r for r in read_shard(shard)}
    for row in rewritten.to_pylist():
        assert row["output_ids"] == expected_tokens(family, images[row["key"].rsplit("#", 1)[0]], row["prompt"])
