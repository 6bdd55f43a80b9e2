"""Which attention kernel a decode step's forwards run: the masks the runner builds (ragged windows, trees) must
not push the target and the draft onto PyTorch's unfused "math" attention, which writes out every score matrix.
On a CPU a boolean mask keeps SDPA's fused flash kernel; on a GPU the same masks are expected to select the
memory-efficient kernel (not checked here: no GPU)."""

import pytest
import torch

from specvlm.specdec.decode import DecodeConfig, SpeculativeDecoder
from specvlm.specdec.tree import TreeSettings

FUSED = "aten::_scaled_dot_product_flash_attention_for_cpu"
UNFUSED = "aten::_scaled_dot_product_attention_math"


def attention_kernels(run) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run()
    return {event.name for event in profile.events() if "scaled_dot_product" in event.name}


@pytest.mark.parametrize("tree", [None, TreeSettings(topk=2, beam=2, max_nodes=6)], ids=["chain", "tree"])
def test_decode_steps_attend_with_the_fused_kernel(family, tree):
    assert family.target.config.get_text_config()._attn_implementation == "sdpa"
    requests = family.requests(3)
    config = DecodeConfig(max_new_tokens=6, eos_token_ids=(), max_rows=3, adaptive=False)
    engine = SpeculativeDecoder(family.target, family.draft("vlm_noisy", gamma=3, tree=tree), config)
    kernels = attention_kernels(lambda: engine.generate(requests))
    assert FUSED in kernels and UNFUSED not in kernels, kernels


def test_an_additive_mask_would_be_seen_unfused():
    """The check above can fail: the profile does show the unfused kernel where SDPA takes it."""
    q = torch.randn(2, 4, 3, 16)
    keys = torch.randn(2, 4, 8, 16)
    mask = torch.zeros(2, 1, 3, 8, requires_grad=True)  # a mask that needs its gradient takes the math path
    kernels = attention_kernels(lambda: torch.nn.functional.scaled_dot_product_attention(q, keys, keys, mask))
    assert UNFUSED in kernels
