"""The shipped demo family (assets/demo/models): it loads through the engine's loaders like any checkpoint, the
target captions held-out images exactly, and speculative decoding with either shipped draft is lossless."""

from pathlib import Path

import pytest
import torch

from specvlm.data.images import decode_image
from specvlm.data.prompts import render
from specvlm.data.sources import list_shards, read_shard
from specvlm.demo.quality import decode_all, is_correct, scene_requests
from specvlm.demo.world import make_scene
from specvlm.engine import DraftSettings, build_draft
from specvlm.models.loading import load_target
from specvlm.specdec.requests import Request

MODELS = Path(__file__).resolve().parents[1] / "assets" / "demo" / "models"
SHARDS = Path(__file__).resolve().parents[1] / "assets" / "demo" / "shards"
HELD_OUT_SEED = 2  # neither training (0) nor the benchmark and the bundled shards (1)


@pytest.fixture(scope="module")
def target():
    torch.set_num_threads(2)
    return load_target(str(MODELS / "target"), device="cpu", dtype="float32")


def text_of(target, result) -> str:
    return target.tokenizer.decode(result.tokens, skip_special_tokens=True).strip()


def test_shipped_family_fits_the_size_budget():
    size = sum(f.stat().st_size for f in MODELS.rglob("*") if f.is_file())
    assert size < 40e6
    for name in ("target", "draft-text", "draft-vlm"):
        assert (MODELS / name / "model.safetensors").exists() and (MODELS / name / "tokenizer.json").exists()


def test_chat_template_renders_the_llava_1_5_format(target):
    assert render("describe the image.", target.processor) == "USER: <image>\ndescribe the image. ASSISTANT:"
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}]
    assert target.processor.apply_chat_template(conversation, add_generation_prompt=True) == (
        "USER: <image>\nwhat is it? ASSISTANT:"
    )


def test_target_captions_the_bundled_shard_images_exactly(target):
    shard = list_shards(str(SHARDS / "00000.tar"))[0]
    records = list(read_shard(shard))[:8]
    prompt = render("describe the image.", target.processor)
    requests = []
    for record in records:
        encoded = target.processor(images=decode_image(record["image"]), text=prompt, return_tensors="pt")
        requests.append(Request(encoded["input_ids"][0].tolist(), encoded["pixel_values"]))
    results = decode_all(target.model, None, requests, eos_token_id=target.tokenizer.eos_token_id)
    assert [text_of(target, r) for r in results] == [r["caption"] for r in records]


# Issue 5's bar, 90% exactly right for both, on 300 held-out scenes: fewer would make it a coin toss (the shipped
# target answers 28 of the first 32 of these, and 274 of all 300).
@pytest.mark.parametrize("task, min_right", [("caption", 0.9), ("vqa", 0.9)])
def test_target_answers_held_out_scenes(target, task, min_right):
    scenes = [make_scene(HELD_OUT_SEED, i) for i in range(300)]
    results = decode_all(
        target.model, None, scene_requests(scenes, task, target.processor), eos_token_id=target.tokenizer.eos_token_id
    )
    right = sum(is_correct(text_of(target, r), s, task) for r, s in zip(results, scenes))
    assert right >= min_right * len(scenes), f"{task}: {right} of {len(scenes)} exactly right"


@pytest.mark.parametrize("kind, min_tau", [("text", 2.0), ("vlm", 3.0)])
def test_speculative_output_with_each_shipped_draft_equals_the_target_output(target, kind, min_tau):
    draft = build_draft(DraftSettings(kind, str(MODELS / f"draft-{kind}"), gamma=5), target)
    scenes = [make_scene(HELD_OUT_SEED, i) for i in range(16, 24)]
    eos = target.tokenizer.eos_token_id
    for task in ("caption", "mc"):
        requests = scene_requests(scenes, task, target.processor)
        reference = decode_all(target.model, None, requests, eos_token_id=eos)
        results = decode_all(target.model, draft, requests, eos_token_id=eos)
        assert [r.tokens for r in results] == [r.tokens for r in reference]
        tau = sum(r.metrics.new_tokens for r in results) / sum(r.metrics.target_calls for r in results)
        assert tau >= min_tau, f"{kind} draft on {task}: tau {tau:.2f}"
