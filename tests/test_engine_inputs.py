"""Targets and inputs beyond the plain LLaVA-1.5 family: sliding-window attention (reproduced), attention rules
the engine cannot reproduce (refused), LLaVA-OneVision, malformed images (an error for that row, the rest
decode), trees pruned to nothing, and a tree's nodes seen at their true positions."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from specvlm.models.build import build_tokenizer
from specvlm.specdec.decode import DecodeConfig, SpeculativeDecoder
from specvlm.specdec.drafts import ModelDraft
from specvlm.specdec.requests import Request
from specvlm.specdec.runner import UnsupportedModel
from specvlm.specdec.sampling import SamplingParams
from specvlm.specdec.tree import TreeDraft, TreeSettings
from tests.fixtures_models import CORPUS

MAX_NEW = 12
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CORPUS, vocab_size=160)


def llava_with(tokenizer, text_config) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def llava_requests(tokenizer, count=3) -> list[Request]:
    side = {"height": 32, "width": 32}
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size=side, crop_size=side),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    rng = np.random.default_rng(0)
    requests = []
    for i in range(count):
        image = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
        text = f"USER: <image>\nquestion {i}, and a longer tail of words about the picture ASSISTANT:"
        enc = processor(images=image, text=text, return_tensors="pt")
        requests.append(Request(enc.input_ids[0].tolist(), enc.pixel_values, image_sizes=None))
    return requests


def generate(model, request: Request) -> list[int]:
    kwargs = {"pixel_values": request.pixel_values}
    if request.image_sizes is not None:
        kwargs["image_sizes"] = request.image_sizes
    out = model.generate(
        input_ids=torch.tensor([request.input_ids]), max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0, **kwargs
    )
    return out[0, len(request.input_ids) :].tolist()


def engine(model, draft=None, rows=4, **config):
    config = DecodeConfig(max_new_tokens=MAX_NEW, eos_token_ids=(-1,), max_rows=rows, adaptive=False, **config)
    return SpeculativeDecoder(model, draft, config)


def noisy_draft(model, **settings) -> ModelDraft:
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * p.std() * 0.2)
    vocab = model.get_output_embeddings().weight.shape[0]
    common = dict(text_only=False, image_token_id=model.config.image_token_id, target_vocab=vocab)
    return ModelDraft(draft, cost_ratio=1.0, name="noisy", gamma=3, **common, **settings)


@pytest.mark.parametrize(
    "text_config",
    [
        # Every layer slides over 8 tokens, far fewer than prompt + output.
        lambda tokenizer: MistralConfig(vocab_size=len(tokenizer), sliding_window=8, **TEXT),
        # Qwen2's first layer attends to everything, the second slides: one mask per layer type.
        lambda tokenizer: Qwen2Config(
            vocab_size=len(tokenizer), use_sliding_window=True, sliding_window=8, max_window_layers=1, **TEXT
        ),
    ],
    ids=["mistral-all-layers", "qwen2-mixed-layers"],
)
def test_sliding_window_targets_decode_like_generate(tokenizer, text_config):
    model = llava_with(tokenizer, text_config(tokenizer))
    requests = llava_requests(tokenizer)
    assert len(requests[0].input_ids) + MAX_NEW > 3 * 8, "test setup: sequences must outgrow the window"
    expected = [generate(model, r) for r in requests]
    for draft in (None, noisy_draft(model)):
        results = engine(model, draft).generate(requests)
        assert [r.tokens for r in results] == expected


def test_an_attention_rule_the_engine_cannot_reproduce_is_refused(tokenizer):
    model = llava_with(tokenizer, Qwen2Config(vocab_size=len(tokenizer), **TEXT))
    model.config.text_config.attention_chunk_size = 16
    with pytest.raises(UnsupportedModel, match="attention_chunk_size"):
        engine(model)


def test_a_sliding_window_shorter_than_a_verification_window_is_exact_for_chains_and_refused_for_trees(tokenizer):
    """A chain's tokens sit at their positions, so a window of 3 (shorter than the chain's 4 verified tokens)
    still decodes like generate; a tree's nodes sit past their positions, and such a window is refused."""
    model = llava_with(tokenizer, MistralConfig(vocab_size=len(tokenizer), sliding_window=3, **TEXT))
    requests = llava_requests(tokenizer)
    results = engine(model, noisy_draft(model)).generate(requests)
    assert [r.tokens for r in results] == [generate(model, r) for r in requests]
    assert sum(r.metrics.accepted_tokens for r in results) > 0
    tree = noisy_draft(model).model
    common = dict(text_only=False, image_token_id=model.config.image_token_id, target_vocab=len(tokenizer))
    with pytest.raises(ValueError, match="sliding window of 3"):
        engine(model, TreeDraft(tree, tree=TreeSettings(), cost_ratio=1.0, name="tree", gamma=3, **common))


@pytest.fixture(scope="module")
def onevision(tokenizer):
    """A tiny LLaVA-OneVision (SigLIP tower, Qwen2 LM, anyres crops) and requests for three image shapes. Its
    processor needs torchvision, whose PyPI builds do not load beside the CPU build of torch used here, so each
    prompt gets as many placeholders as the model's own get_image_features yields for its image."""
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    grid = [[32, 32], [32, 64], [64, 32], [64, 64]]
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=Qwen2Config(vocab_size=len(tokenizer), **TEXT),
        image_token_id=image_token,
        video_token_id=tokenizer.unk_token_id,
        image_grid_pinpoints=grid,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    images = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=grid)
    rng = np.random.default_rng(0)
    requests = []
    for i, (h, w) in enumerate([(40, 70), (70, 40), (30, 30)]):
        pixels = images(images=Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)), return_tensors="pt")
        probe = Request([image_token, 1], pixels["pixel_values"], image_sizes=pixels["image_sizes"])
        count = _feature_count(probe, model)
        ids = tokenizer("USER: ").input_ids + [image_token] * count
        ids += tokenizer(f"\nquestion {i} ASSISTANT:", add_special_tokens=False).input_ids
        requests.append(Request(ids, pixels["pixel_values"], image_sizes=pixels["image_sizes"]))
    return model, requests


def _feature_count(request: Request, model) -> int:
    out = model.get_image_features(
        pixel_values=request.pixel_values,
        image_sizes=request.image_sizes,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    return len(out.pooler_output[0])


def test_llava_onevision_decodes_like_generate_batched_and_with_a_draft(onevision):
    model, requests = onevision
    assert len({len(r.input_ids) for r in requests}) == 3, "test setup: the images give different token counts"
    expected = [generate(model, r) for r in requests]
    for draft in (None, noisy_draft(model)):
        assert [r.tokens for r in engine(model, draft).generate(requests)] == expected


def test_malformed_onevision_rows_get_errors_and_the_others_decode(onevision):
    model, requests = onevision
    good = requests[0]
    image_token = model.config.image_token_id
    one_short = good.input_ids.copy()
    one_short.remove(image_token)
    bad = {
        "image_sizes must be": Request(good.input_ids, good.pixel_values, image_sizes=None),
        "expects 5 dimensions": Request(good.input_ids, good.pixel_values[0], image_sizes=good.image_sizes),
        "channels": Request(good.input_ids, good.pixel_values[:, :, :2], image_sizes=good.image_sizes),
        "the model expects": Request(one_short, good.pixel_values, image_sizes=good.image_sizes),
    }
    results = engine(model, rows=6).generate([requests[1], *bad.values(), requests[2]])
    for message, result in zip(bad, results[1:-1]):
        assert result.stop_reason == "error" and message in result.error, (message, result.error)
    assert results[0].tokens == generate(model, requests[1]) and results[-1].tokens == generate(model, requests[2])


def test_rows_whose_feature_errors_would_cancel_out_are_both_refused(onevision):
    """Two rows, one placeholder short and one over: the batch's total matches, so a model that checks only the
    total would trade features between them. The engine checks each row."""
    model, requests = onevision
    short, extra = requests[0].input_ids.copy(), requests[1].input_ids.copy()
    short.remove(model.config.image_token_id)
    extra.insert(extra.index(model.config.image_token_id), model.config.image_token_id)
    rows = [
        Request(short, requests[0].pixel_values, requests[0].image_sizes),
        Request(extra, requests[1].pixel_values, requests[1].image_sizes),
    ]
    assert all(r.stop_reason == "error" for r in engine(model).generate(rows))


def test_bad_pixels_in_a_llava_batch_become_error_rows(family):
    good = family.request("what is this?")
    bad = {
        "channels": Request(good.input_ids, good.pixel_values[:, :2]),
        "NaN": Request(good.input_ids, torch.full_like(good.pixel_values, float("nan"))),
        "4 dimensions": Request(good.input_ids, good.pixel_values[0]),
    }
    others = family.requests(2)
    config = DecodeConfig(max_new_tokens=MAX_NEW, eos_token_ids=(family.tokenizer.eos_token_id,), adaptive=False)
    results = SpeculativeDecoder(family.target, family.draft("vlm_noisy"), config).generate(
        [others[0], *bad.values(), others[1]]
    )
    for message, result in zip(bad, results[1:-1]):
        assert result.stop_reason == "error" and message in result.error, (message, result.error)
    assert [results[0].tokens, results[-1].tokens] == [family.reference(r, MAX_NEW) for r in others]


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.7)], ids=["greedy", "sampled"])
def test_trees_pruned_to_nothing_decode_like_the_target(family, sampling):
    """min_score above every path's probability: each step verifies an empty tree, one target token per step."""
    requests = family.requests(3)
    tree = TreeSettings(topk=2, beam=2, max_nodes=8, min_score=0.999)
    config = DecodeConfig(max_new_tokens=MAX_NEW, eos_token_ids=(-1,), adaptive=False, sampling=sampling)
    results = SpeculativeDecoder(family.target, family.draft("vlm_noisy", gamma=3, tree=tree), config).generate(
        requests
    )
    assert all(r.error is None and len(r.tokens) == MAX_NEW for r in results)
    if sampling.greedy:
        assert [r.tokens for r in results] == [family.reference(r, MAX_NEW, eos=-1) for r in requests]
        assert all(n == 0 for r in results for n in r.metrics.nodes_per_step)


def test_tree_nodes_see_the_draft_at_their_true_positions(family):
    """Each node's draft distribution is the draft model's own next-token distribution after the node's path:
    a tree fed at the wrong positions would draft from different distributions (and accept less). A tiny random
    model barely looks at positions, so its queries and keys are sharpened first: attention then follows the
    rotary positions, and a tree one position off misses by ~5e-4, against ~1e-9 when right."""
    requests = family.requests(3)
    model = copy.deepcopy(family.drafts["vlm_noisy"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    draft = TreeDraft(
        model,
        tree=TreeSettings(topk=2, beam=2, max_nodes=12),
        text_only=False,
        image_token_id=family.image_token_id,
        target_vocab=family.target_vocab,
        cost_ratio=1.0,
        name="sharp",
        gamma=3,
    )
    draft.allocate(len(requests), 128)
    assert draft.admit(list(range(len(requests))), requests) == {}
    proposal = draft.propose(len(requests), 3, SamplingParams(temperature=1.0), _Uniforms(len(requests)))
    for row, request in enumerate(requests):
        for node in range(int(proposal.lengths[row])):
            path = []  # the tokens from the root's first child down to this node's parent
            parent = int(proposal.parents[row, node])
            while parent >= 0:
                path.insert(0, int(proposal.tokens[row, parent]))
                parent = int(proposal.parents[row, parent])
            with torch.no_grad():
                logits = model(
                    input_ids=torch.tensor([request.input_ids + path]), pixel_values=request.pixel_values
                ).logits[0, -1]
            torch.testing.assert_close(proposal.probs[row, node], logits.softmax(-1), atol=1e-6, rtol=0)


class _Uniforms:
    """Stands in for RowRandom: uniforms from one seeded generator."""

    def __init__(self, rows):
        self.generator = torch.Generator().manual_seed(0)

    def uniforms(self, n, count):
        return torch.rand(n, count, generator=self.generator)
