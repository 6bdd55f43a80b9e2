"""The draft's lean forward computes what Hugging Face's forward computes, through the same cache and masks."""

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from specvlm.specdec.lean_llama import LeanLlama
from specvlm.specdec.prefill import prefill
from specvlm.specdec.runner import ModelRunner, causal_attend

SMALL = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def _text_lm(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SMALL, attention_bias=True))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**SMALL, sliding_window=None))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**SMALL))  # q/k/v carry biases
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # make zero-initialised biases matter
    return model.eval()


def _lean(model, lean: bool) -> LeanLlama | None:
    forward = LeanLlama.of(model) if lean else None
    assert (forward is not None) == lean
    return forward


def _steps(model, prompt: torch.Tensor, lengths: torch.Tensor, lean: bool) -> list[torch.Tensor]:
    """Logits of a prefill, a ragged chain step and a tree step, with rows of different committed lengths."""
    runner = ModelRunner(model, prompt.shape[0], prompt.shape[1] + 16, lean=_lean(model, lean))
    out = [runner.forward(prompt, causal_attend(lengths, prompt.shape[1]))]
    runner.set_lengths(slice(0, prompt.shape[0]), lengths, lengths.numpy())
    return out + _decode_steps(runner)


def _decode_steps(runner: ModelRunner) -> list[torch.Tensor]:
    """A ragged chain step and a tree step on whatever the runner's rows have committed."""
    n = runner.rows
    draw = torch.Generator().manual_seed(1)
    out = []
    chain = torch.randint(5, 90, (n, 3), generator=draw)
    out.append(runner.forward(chain, causal_attend(torch.tensor([3, 1] * (n // 2) + [2] * (n % 2)), 3)))
    # A tree: node 0 is the root's child, nodes 1 and 2 are both children of node 0, at depth 1, 2, 2.
    tree = torch.randint(5, 90, (n, 3), generator=draw)
    attend = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool).expand(n, 3, 3)
    out.append(runner.forward(tree, attend, depth=torch.tensor([0, 1, 1]).expand(n, 3)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_lean_forward_matches_hugging_face_text_models(kind, dtype):
    model = _text_lm(kind).to(dtype)
    assert LeanLlama.of(model) is not None
    prompt = torch.randint(5, 90, (3, 7))
    lengths = torch.tensor([7, 4, 6])
    for hf, lean in zip(_steps(model, prompt, lengths, False), _steps(model, prompt, lengths, True)):
        torch.testing.assert_close(lean, hf, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", ["mha", "gqa", "mqa"])
def test_lean_forward_matches_hugging_face_vlm_drafts(families, shape):
    """A VLM draft's prefill (with pixels) runs through Hugging Face; its decode steps through the lean forward,
    reading the keys and values the prefill left in the cache."""
    family = families[shape]
    requests = family.requests(4)
    model = family.drafts["vlm_noisy"]
    ids = [r.input_ids for r in requests]
    width = max(map(len, ids)) + 16
    steps = [_decode_steps(prefill(model, requests, ids, width, lean=_lean(model, lean))[0]) for lean in (False, True)]
    for a, b in zip(*steps):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_architectures_it_does_not_reproduce_keep_hugging_face():
    scaled = LlamaForCausalLM(LlamaConfig(**SMALL, rope_scaling={"rope_type": "linear", "factor": 2.0}))
    gelu = LlamaForCausalLM(LlamaConfig(**SMALL, hidden_act="gelu"))
    windowed = MistralForCausalLM(MistralConfig(**SMALL, sliding_window=4))
    other_family = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=48, n_layer=2, n_head=4))  # no .model inside
    for model in (scaled, gelu, windowed, other_family):
        assert LeanLlama.of(model) is None
