"""Which attention kernels the engine's forwards run, and a check that none of them is PyTorch's unfused math
attention.

scaled_dot_product_attention picks a kernel per call from its inputs (device, dtype, mask, shapes); where no fused
kernel takes them it quietly runs the math path, which writes out every score matrix: on a GPU the slow path of
a verification window. `check_fused` runs a decode with the math backend excluded (torch.nn.attention.sdpa_kernel),
so such a call raises instead of running slowly, and profiles it to name the fused kernels that did run. A model
that never calls SDPA (attn_implementation "eager") fails it too: its attention is unfused by construction.

The profile records operators as they are dispatched, so it sees eager and inductor-compiled forwards, but not the
inside of a CUDA graph replay: check decoding eagerly, which meets the same attention calls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from specvlm.evaluation.replay import ReplayDraft, record_scripts
from specvlm.specdec.decode import DecodeConfig, SpeculativeDecoder
from specvlm.specdec.requests import Request

FUSED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
KERNEL_PREFIX = "aten::_scaled_dot_product_"  # the kernels SDPA dispatches to: flash, efficient, cudnn, math
UNFUSED = "aten::_scaled_dot_product_attention_math"


class UnfusedAttention(RuntimeError):
    """An attention call of the checked run would run (or ran) PyTorch's unfused math attention."""


def attention_kernels(run: Callable[[], object]) -> set[str]:
    """The SDPA kernels `run` dispatched to (operator names, e.g. aten::_scaled_dot_product_efficient_attention)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run()
    return {event.name for event in profile.events() if event.name.startswith(KERNEL_PREFIX)}


def check_fused(run: Callable[[], object], path: str) -> set[str]:
    """Runs `run` with math attention excluded; returns the fused kernels it used, or raises UnfusedAttention
    naming `path` (what was run, for the message)."""
    try:
        with sdpa_kernel(FUSED_BACKENDS):
            kernels = attention_kernels(run)
    except RuntimeError as exc:
        reason = (str(exc).strip().splitlines() or [""])[0][:300]
        raise UnfusedAttention(
            f"{path}: an attention call has no fused SDPA kernel for its inputs and would run unfused math "
            f"attention ({type(exc).__name__}: {reason}); look at the mask's dtype and layout and the model's dtype"
        ) from exc
    if not kernels:
        raise UnfusedAttention(
            f"{path}: no call reached scaled_dot_product_attention, so attention ran unfused; load the model with "
            "attn_implementation='sdpa'"
        )
    if UNFUSED in kernels:  # the exclusion should make this unreachable; a backend that ignored it is still caught
        raise UnfusedAttention(f"{path}: ran {UNFUSED} although it was excluded")
    return kernels


def check_engine(
    target, requests: list[Request], *, max_new_tokens: int, static_shapes: bool
) -> dict[str, set[str] | UnfusedAttention]:
    """Plain decoding, chain verification and tree verification through the engine (admission's prompt passes
    included), each checked by check_fused; path -> its fused kernels, or the failure. The drafts replay the
    target's own continuation with one token in five wrong, so windows are ragged and trees are pruned.
    static_shapes: decode at bucketed shapes, as compiled forwards on a GPU do."""
    config = DecodeConfig(
        max_new_tokens=max_new_tokens,
        eos_token_ids=(),
        max_rows=len(requests),
        adaptive=False,
        static_shapes=static_shapes,
    )
    reference = SpeculativeDecoder(target, None, config).generate(requests)
    scripts = record_scripts(requests, [r.tokens for r in reference])
    vocab = target.get_output_embeddings().weight.shape[0]

    def replay(siblings: int) -> ReplayDraft:
        return ReplayDraft(
            scripts, error_rate=0.2, target_vocab=vocab, device=target.device, gamma=4, siblings=siblings
        )

    paths = {
        "plain decoding: prompt pass and one-token steps": lambda: None,
        "chain verification: a replayed draft, γ=4": lambda: replay(1),
        "tree verification: a replayed draft, γ=4, 2 siblings": lambda: replay(2),
    }
    found = {}
    for path, make in paths.items():
        engine = SpeculativeDecoder(target, make(), config)
        try:
            found[path] = check_fused(lambda engine=engine: engine.generate(requests), path)
        except UnfusedAttention as failure:
            found[path] = failure
    return found
