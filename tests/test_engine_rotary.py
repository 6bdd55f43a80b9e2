"""Rotary scalings against the target's own generate, batched with rows of very different lengths that run to the
position limit.

Two of the rotary types transformers ships pick their frequencies from the longest position in a forward: dynamic
NTK rescales once a forward reaches past max_position_embeddings, and longrope switches from its short to its long
factors once it reaches past original_max_position_embeddings. `generate` for one request computes the prompt in
one forward and every later token alone, so each token's frequencies follow from its own position (and the
prompt's length); a batched pass must not let one row's positions, or its padding, choose them for the others.
The other types (default, linear, yarn, llama3) depend on the position alone.
"""

import copy

import pytest
import torch
from transformers import LlamaConfig, Phi3Config, Phi3ForCausalLM

from specvlm.models.build import build_tokenizer
from specvlm.specdec.decode import DecodeConfig, SpeculativeDecoder
from specvlm.specdec.drafts import ModelDraft
from specvlm.specdec.requests import Request
from specvlm.specdec.rotary import UnsupportedRotary
from specvlm.specdec.tree import TreeDraft, TreeSettings
from tests.fixtures_models import CORPUS
from tests.test_engine_inputs import llava_requests, llava_with

MAX_POSITIONS = 96
ORIGINAL = 40  # longrope, yarn and llama3: the pretraining length the scaling extends
HALF_HEAD = 8  # head_dim 16
SHARPEN = 8.0
ROPES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": ORIGINAL},
    "longrope": {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.1 * i for i in range(HALF_HEAD)],
        "long_factor": [1.0 + 0.9 * i for i in range(HALF_HEAD)],
        "original_max_position_embeddings": ORIGINAL,
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": ORIGINAL,
    },
}
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=MAX_POSITIONS,
)
# With the image's 16 placeholders: prompts of 34 to 60 tokens, on both sides of ORIGINAL (longrope's prompt forward
# takes the long factors for the longer ones only; the shorter ones cross ORIGINAL while decoding).
TAILS = ["", "what colour is the square?", "fox", "a red"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CORPUS, vocab_size=160)


def target_with(tokenizer, rope: str):
    """A LLaVA over a Llama language model with rotary `rope`, or (phi3-longrope) over a Phi-3 one."""
    family = Phi3Config if rope == "phi3-longrope" else LlamaConfig
    parameters = {"rope_theta": 10000.0, **ROPES[rope.removeprefix("phi3-")]}
    extra = {"pad_token_id": 0} if family is Phi3Config else {}  # Phi-3's default pad id is past this vocabulary
    model = llava_with(tokenizer, family(vocab_size=len(tokenizer), rope_parameters=parameters, **extra, **TEXT))
    # Random weights attend almost uniformly, which hides the rotary; sharper queries and keys (and values, where
    # Phi-3 fuses them) make every token's output depend on its frequencies.
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for name in ("q_proj", "k_proj", "qkv_proj"):
                if hasattr(layer.self_attn, name):
                    getattr(layer.self_attn, name).weight.mul_(SHARPEN)
    model.generation_config.eos_token_id = None  # every request runs to the position limit, in generate too
    return model


def requests_of(tokenizer) -> list[Request]:
    base = llava_requests(tokenizer, count=1)[0]
    image = tokenizer.convert_tokens_to_ids("<image>")
    placeholders = [t for t in base.input_ids if t == image]
    requests = []
    for tail in TAILS:
        ids = tokenizer("USER: ", add_special_tokens=False).input_ids + placeholders
        ids += tokenizer(f"\n{tail} ASSISTANT:", add_special_tokens=False).input_ids
        requests.append(Request(ids, base.pixel_values, image_sizes=None))
    # one prompt exactly one past ORIGINAL: its prompt forward is the first to take longrope's long factors
    padded = requests[0].input_ids
    padded = padded[:-1] + [padded[-2]] * (ORIGINAL + 1 - len(padded)) + padded[-1:]
    requests.append(Request(padded, base.pixel_values, image_sizes=None))
    return requests


def generate_alone(model, request: Request) -> list[int]:
    """The request alone, up to the position limit (where the engine stops it: stop reason max_positions)."""
    out = model.generate(
        input_ids=torch.tensor([request.input_ids]),
        pixel_values=request.pixel_values,
        max_new_tokens=MAX_POSITIONS - len(request.input_ids),
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(request.input_ids) :].tolist()


def drafts_of(model):
    noisy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * p.std() * 0.2)
    vocab = model.get_output_embeddings().weight.shape[0]
    common = dict(text_only=False, image_token_id=model.config.image_token_id, target_vocab=vocab)
    return {
        "none": None,
        "chain": ModelDraft(noisy, cost_ratio=1.0, name="chain", gamma=4, **common),
        "tree": TreeDraft(noisy, tree=TreeSettings(), cost_ratio=1.0, name="tree", gamma=3, **common),
    }


@pytest.mark.parametrize("rope", [*ROPES, "phi3-longrope"])
def test_rotary_scalings_decode_like_generate_batched_to_the_position_limit(tokenizer, rope):
    """phi3-longrope: a LLaVA's generate keeps its cache across longrope's switch (a plain Phi-3's does not, see
    below), so its tokens take the factors of their own extent, as a Llama's do."""
    model = target_with(tokenizer, rope)
    requests = requests_of(tokenizer)
    lengths = sorted(len(r.input_ids) for r in requests)
    assert lengths[0] < ORIGINAL < lengths[-1] and ORIGINAL + 1 in lengths, f"test setup: prompt lengths {lengths}"
    expected = [generate_alone(model, r) for r in requests]
    for kind, draft in drafts_of(model).items():
        config = DecodeConfig(max_new_tokens=MAX_POSITIONS, eos_token_ids=(-1,), max_rows=len(requests), adaptive=False)
        results = SpeculativeDecoder(model, draft, config).generate(requests)
        assert [r.stop_reason for r in results] == ["max_positions"] * len(requests), kind
        for i, (result, want) in enumerate(zip(results, expected)):
            assert result.tokens == want, f"{rope}, draft {kind}, request {i} ({len(requests[i].input_ids)} tokens)"
        # outside the engine the model is its own: generate still gives what it gave before
        assert generate_alone(model, requests[1]) == expected[1]


def test_a_target_whose_generate_recomputes_its_cache_for_longrope_is_refused(tokenizer):
    rope = {"rope_theta": 10000.0, **ROPES["longrope"]}
    config = Phi3Config(vocab_size=len(tokenizer), rope_parameters=rope, pad_token_id=0, **TEXT)
    config.original_max_position_embeddings = ORIGINAL
    target = Phi3ForCausalLM(config).eval()
    with pytest.raises(UnsupportedRotary, match="longrope"):
        SpeculativeDecoder(target, None, DecodeConfig(max_new_tokens=4, eos_token_ids=(-1,), max_rows=1))
