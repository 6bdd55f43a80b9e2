"""The float32 head: the final norm and LM head in float32 on the decoder's hidden states."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specvlm.specdec.lean_llama import LeanLlama
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


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # a final norm weight far from ones: norming twice would show
    return model.to(dtype).eval()


def _logits(model, prompt, float32_head: bool, lean: bool) -> torch.Tensor:
    runner = ModelRunner(
        model,
        prompt.shape[0],
        prompt.shape[1] + 4,
        lean=LeanLlama.of(model) if lean else None,
        float32_head=float32_head,
    )
    lengths = torch.full((prompt.shape[0],), 0)
    return runner.forward(prompt, causal_attend(lengths, prompt.shape[1]))


@pytest.mark.parametrize("lean", [False, True])
def test_float32_head_matches_the_plain_head_in_float32(lean):
    model = _model(torch.float32)
    prompt = torch.randint(0, 97, (2, 7))
    torch.testing.assert_close(_logits(model, prompt, True, lean), _logits(model, prompt, False, lean))
