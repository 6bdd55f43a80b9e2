"""The engine serves LLaVA-NeXT (anyres: a varying number of image crops per request) through the same code, and
refuses at load a NeXT draft that expands images on another crop grid. Drafts outside the Llama family run through
their Hugging Face forward (GPT-2, OPT), or are refused at load by name where that forward cannot run in the
engine's cache (BLOOM)."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from specvlm.engine import DraftSettings, build_draft
from specvlm.models.build import build_tokenizer
from specvlm.models.checkpoints import ModelLoadError
from specvlm.models.compat import check_draft_fits, check_same_image_tokens
from specvlm.models.loading import load_target
from specvlm.specdec.decode import DecodeConfig, SpeculativeDecoder
from specvlm.specdec.drafts import ModelDraft
from specvlm.specdec.prefill import image_features
from specvlm.specdec.requests import Request
from specvlm.specdec.sampling import SamplingParams
from specvlm.specdec.tree import TreeDraft, TreeSettings
from tests.fixtures_models import CORPUS, build_foreign_draft

GRID = [[32, 32], [32, 64], [64, 32]]


@pytest.fixture(scope="module")
def next_family():
    tokenizer = build_tokenizer(CORPUS, vocab_size=160)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token,
        image_grid_pinpoints=GRID,
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    target = LlavaNextForConditionalGeneration(config).eval()
    noisy = copy.deepcopy(target)
    with torch.no_grad():
        for name, p in noisy.named_parameters():
            if "language_model" in name:
                p.add_(torch.randn_like(p) * p.std() * 0.3)
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=GRID
        ),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    rng = np.random.default_rng(0)
    requests = []
    for i, (h, w) in enumerate([(40, 70), (70, 40), (30, 30), (50, 90)]):
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        enc = processor(images=image, text=f"USER: <image>\nquestion {i} ASSISTANT:", return_tensors="pt")
        requests.append(Request(enc.input_ids[0].tolist(), enc.pixel_values, image_sizes=enc.image_sizes))
    return tokenizer, target, noisy, requests, processor


def test_llava_next_requests_really_differ_in_crop_count(next_family):
    _, _, _, requests, _ = next_family
    assert len({r.pixel_values.shape[1] for r in requests}) > 1
    assert len({len(r.input_ids) for r in requests}) > 1


@pytest.mark.parametrize("draft", ["none", "chain", "tree"])
def test_llava_next_greedy_matches_generate(next_family, draft):
    tokenizer, target, noisy, requests, _ = next_family
    expected = [
        target.generate(
            input_ids=torch.tensor([r.input_ids]),
            pixel_values=r.pixel_values,
            image_sizes=r.image_sizes,
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
        )[0, len(r.input_ids) :].tolist()
        for r in requests
    ]
    common = dict(
        text_only=False,
        image_token_id=target.config.image_token_id,
        target_vocab=len(tokenizer),
        cost_ratio=1.0,
        name=draft,
        gamma=3,
    )
    drafts = {
        "none": None,
        "chain": ModelDraft(noisy, **common),
        "tree": TreeDraft(noisy, tree=TreeSettings(topk=2, beam=2, max_nodes=8), **common),
    }
    config = DecodeConfig(max_new_tokens=12, eos_token_ids=(tokenizer.eos_token_id,), adaptive=False)
    results = SpeculativeDecoder(target, drafts[draft], config).generate(requests)
    assert [r.tokens for r in results] == expected
    if draft != "none":
        assert sum(r.metrics.accepted_tokens for r in results) > 0


def test_a_next_draft_on_another_crop_grid_is_refused_at_load(next_family, tmp_path):
    """Same vision tower sizes, another image_grid_pinpoints: the draft would expand most images to another number
    of features than the target's prompt holds, so every such request would lose its draft at run time."""
    tokenizer, target, _, requests, processor = next_family
    config = copy.deepcopy(target.config)
    config.image_grid_pinpoints = [[32, 32], [64, 64]]
    torch.manual_seed(1)
    other_grid = LlavaNextForConditionalGeneration(config).eval()
    assert any(isinstance(f, str) for f in image_features(requests, other_grid)), "test setup: the grids must differ"
    target.save_pretrained(tmp_path / "target")
    processor.save_pretrained(tmp_path / "target")
    other_grid.save_pretrained(tmp_path / "draft")
    tokenizer.save_pretrained(tmp_path / "draft")
    loaded = load_target(str(tmp_path / "target"), device="cpu", dtype="float32")
    with pytest.raises(ModelLoadError, match="image_grid_pinpoints differ"):
        build_draft(DraftSettings("vlm", str(tmp_path / "draft")), loaded)
    # The job's preflight reads the same from the two config.json files, before any weights load.
    configs = [json.loads((tmp_path / name / "config.json").read_text()) for name in ("draft", "target")]
    with pytest.raises(ModelLoadError, match="image_grid_pinpoints differ"):
        check_draft_fits("vlm", *configs, "draft")


def test_a_onevision_draft_pooling_crops_otherwise_is_refused():
    target = {"image_grid_pinpoints": [[384, 384], [384, 768]], "vision_aspect_ratio": "anyres_max_9"}
    check_same_image_tokens(target, {**target, "image_grid_pinpoints": ((384, 384), (384, 768))}, "draft")
    with pytest.raises(ModelLoadError, match="vision_aspect_ratio differ"):
        check_same_image_tokens(target, {**target, "vision_aspect_ratio": "anyres_max_4"}, "draft")


@pytest.fixture(scope="module")
def saved_family(family, tmp_path_factory):
    """The mha family's target on disk, and a folder per foreign draft architecture with the family's tokenizer."""
    root = tmp_path_factory.mktemp("foreign-drafts")
    family.target.save_pretrained(root / "target")
    family.processor.save_pretrained(root / "target")
    for architecture in ("gpt2", "opt", "bloom"):
        build_foreign_draft(family.tokenizer, architecture).save_pretrained(root / architecture)
        family.tokenizer.save_pretrained(root / architecture)
    return root


@pytest.mark.parametrize("architecture", ["gpt2", "opt"])
@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_gpt2_and_opt_drafts_decode_like_generate(family, saved_family, architecture, mode):
    target = load_target(str(saved_family / "target"), device="cpu", dtype="float32")
    settings = DraftSettings("text", str(saved_family / architecture), mode=mode, gamma=3)
    draft = build_draft(settings, target)
    requests = family.requests(4)
    config = DecodeConfig(max_new_tokens=12, eos_token_ids=(family.tokenizer.eos_token_id,), adaptive=False)
    results = SpeculativeDecoder(target.model, draft, config).generate(requests)
    assert [r.tokens for r in results] == [family.reference(r, 12) for r in requests]
    assert all(r.metrics.proposed_tokens > 0 for r in results)


@pytest.mark.parametrize("architecture", ["gpt2", "opt"])
def test_gpt2_and_opt_drafts_propose_their_own_greedy_continuation(family, architecture):
    """Through the engine's cache, masks and positions, a draft proposes what its own generate would write next:
    the forward is driven right, not just harmlessly wrong."""
    model = build_foreign_draft(family.tokenizer, architecture)
    draft = ModelDraft(
        model,
        text_only=True,
        image_token_id=family.image_token_id,
        target_vocab=family.target_vocab,
        cost_ratio=0.1,
        name=architecture,
        gamma=5,
    )
    requests = family.requests(3)
    draft.allocate(len(requests), 64)
    draft.admit(list(range(len(requests))), requests)
    proposal = draft.propose(len(requests), 5, SamplingParams(), None)
    for row, request in enumerate(requests):
        text = [t for t in request.input_ids if t != family.image_token_id]
        own = model.generate(input_ids=torch.tensor([text]), max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert proposal.tokens[row].tolist() == own[0, len(text) :].tolist()


def test_a_draft_the_engine_cannot_drive_is_refused_at_load_by_name(saved_family):
    target = load_target(str(saved_family / "target"), device="cpu", dtype="float32")
    with pytest.raises(ModelLoadError, match=r"\(bloom\) cannot run in the engine"):
        build_draft(DraftSettings("text", str(saved_family / "bloom")), target)
