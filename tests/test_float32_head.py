"""The float32 head: the final norm and LM head in float32 on the decoder's hidden states."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from specvlm.specdec.decode import DecodeConfig, SpeculativeDecoder
from specvlm.specdec.lean_llama import LeanLlama
from specvlm.specdec.runner import ModelRunner, causal_attend
from tests.test_lean_llama import SMALL


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
    lengths = torch.full((prompt.shape[0],), prompt.shape[1])
    return runner.forward(prompt, causal_attend(lengths, prompt.shape[1]))


@pytest.mark.parametrize("lean", [False, True])
def test_float32_head_matches_the_plain_head_in_float32(lean):
    model = _model(torch.float32)
    prompt = torch.randint(0, 97, (2, 7))
    torch.testing.assert_close(_logits(model, prompt, True, lean), _logits(model, prompt, False, lean))


@pytest.mark.parametrize("lean", [False, True])
def test_in_bf16_the_logits_are_a_float32_norm_and_head_of_the_bf16_hidden_states(lean):
    model = _model(torch.bfloat16)
    prompt = torch.randint(0, 97, (2, 7))
    got = _logits(model, prompt, True, lean)
    assert got.dtype == torch.float32
    # The decoder's last hidden states in bf16, before its final norm (the last layer's output).
    states = []
    hook = model.model.layers[-1].register_forward_hook(lambda module, args, out: states.append(out))
    model(input_ids=prompt)
    hook.remove()
    hidden = states[0][0] if isinstance(states[0], tuple) else states[0]
    assert hidden.dtype == torch.bfloat16
    eps = model.config.rms_norm_eps
    normed = F.rms_norm(hidden.float(), (hidden.shape[-1],), eps=eps) * model.model.norm.weight.float()
    expected = F.linear(normed, model.lm_head.weight.float())
    # The lean forward rounds its layers apart from Hugging Face's (test_lean_llama.py): to bf16 rounding there.
    tolerance = dict(rtol=2e-2, atol=5e-2) if lean else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, expected, **tolerance)
    # ... and not the bf16 head's logits, which are rounded to bf16.
    assert not torch.equal(got, _logits(model, prompt, False, lean).float())


@pytest.mark.parametrize("compile", [False, True])
def test_float32_head_decodes_token_identical_to_generate_in_float32(family, compile):
    """Eager and compiled (fullgraph: a graph break in the float32 head would show as a fall-back to eager)."""
    requests = family.requests(4)
    expected = [family.reference(r, 16) for r in requests]
    config = DecodeConfig(
        max_new_tokens=16,
        eos_token_ids=(family.tokenizer.eos_token_id,),
        max_rows=4,
        adaptive=False,
        compile=compile,
        float32_head=True,
    )
    engine = SpeculativeDecoder(family.target, family.draft("vlm_noisy", gamma=3), config)
    results = engine.generate(requests)
    assert [r.tokens for r in results] == expected
    assert sum(r.metrics.accepted_tokens for r in results) > 0  # verification windows, not one token a pass
    if compile:
        assert engine.describe()["compile"]["fell_back_to_eager"] is None
