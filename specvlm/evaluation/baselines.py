"""What users would run instead, timed the same way: Hugging Face `generate` (batched, greedy) and Hugging
Face assisted generation (`assistant_model`, batch size 1 only), plus the forward-pass timings behind the cost
ratios of the speedup limits (specvlm/evaluation/benchmark.py): c = draft forward / target forward, one token per row,
which tau / (gamma * c + 1) needs, and r = target forward over q tokens per row / over one, which that limit
assumes to be 1 (a forward bound by reading the weights, as a 7B model on a GPU is; a small model on a CPU is
bound by arithmetic instead, and r grows with q)."""

from __future__ import annotations

import time

import torch

from specvlm.specdec.lean_llama import LeanLlama
from specvlm.specdec.prefill import image_inputs, prefill
from specvlm.specdec.requests import Request
from specvlm.specdec.runner import causal_attend


def _trim(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


@torch.inference_mode()
def hf_generate(
    target, requests: list[Request], max_new_tokens: int, batch: int, eos: tuple[int, ...], pad_id: int, assistant=None
) -> tuple[list[list[int]], float]:
    """Greedy `generate` over left-padded batches (or with an assistant model, one request at a time). eos with
    no valid id means "never stop": then the model's generation config must not name one either."""
    if assistant is not None and batch != 1:
        raise ValueError("Hugging Face assisted generation supports batch size 1 only")
    outputs, start = [], time.perf_counter()
    for i in range(0, len(requests), batch):
        group = requests[i : i + batch]
        width = max(len(r.input_ids) for r in group)
        ids = torch.tensor([[pad_id] * (width - len(r.input_ids)) + r.input_ids for r in group], device=target.device)
        mask = torch.tensor(
            [[0] * (width - len(r.input_ids)) + [1] * len(r.input_ids) for r in group], device=target.device
        )
        extra = {"assistant_model": assistant} if assistant is not None else {}
        stop = [t for t in eos if t >= 0]
        if stop:
            extra["eos_token_id"] = stop
        out = target.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            **image_inputs(group, target),
            **extra,
        )
        outputs += [_trim(row[width:].tolist(), set(eos)) for row in out]
    return outputs, time.perf_counter() - start


@torch.inference_mode()
def forward_time(
    model, rows: list[Request], with_images: bool, q: int = 1, steps: int = 20, lean: LeanLlama | None = None
) -> float:
    """Seconds per forward of `model` with q new tokens per row, after prefilling the rows' prompts (lean: the
    draft's LeanLlama, as a draft runs; see ModelRunner)."""
    width = max(len(r.input_ids) for r in rows)
    runner, _, errors = prefill(
        model, rows, [r.input_ids for r in rows], width + steps * q + 2 * q, use_images=with_images, lean=lean
    )
    if errors:
        raise ValueError(f"cannot time a forward on these rows: {next(iter(errors.values()))}")
    tokens = torch.tensor([r.input_ids[:1] for r in rows], device=model.device)
    new = tokens[:, :1].expand(-1, q)
    attend = causal_attend(torch.full((len(rows),), q, dtype=torch.long, device=model.device), q)
    runner.forward(new, attend)  # warm-up
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    advance = torch.full((len(rows),), q, device=model.device)
    for _ in range(steps):
        runner.forward(new, attend)
        runner.advance(len(rows), advance, q)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def draft_forward_time(target, draft_model, requests: list[Request], lean: LeanLlama | None) -> float:
    """Seconds per one-token draft forward on the same rows, run as the engine runs that draft (see ModelDraft);
    a text-only draft reads the prompt without its image placeholders, as the engine feeds it."""
    if hasattr(draft_model.config, "vision_config"):
        return forward_time(draft_model, requests, True, lean=lean)
    image_token = target.config.image_token_id
    return forward_time(
        draft_model, [Request([t for t in r.input_ids if t != image_token]) for r in requests], False, lean=lean
    )
