"""vLLM plain decoding of the same target on the same prompts, images and lengths: the baseline a GPU user has
without this engine (vLLM takes no separate draft model for a multimodal target), in images per second beside
the engine's best plain and best speculative settings.

vLLM is optional: nothing here imports it at module level, and `vllm_missing` says why it cannot run. It loads
the target from a checkpoint folder (save_checkpoint), as a user's job would. For a fair race:
- greedy, no EOS (`ignore_eos`), `max_tokens` = the engine's max_new_tokens: both do the same number of tokens;
- prefix caching and the multimodal input cache off: the timed rounds repeat the same requests, which either
  cache would answer from the round before, while the engine prefills every request every round;
- vLLM's time includes its image preprocessing (the Hugging Face processor, inside `generate`); the engine's
  requests were preprocessed beforehand, so the engine's images/s here add that preprocessing time, measured.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image


def vllm_missing() -> str | None:
    """Why vLLM cannot run here (it does not import, or there is no GPU), or None."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # an install built for another torch fails with more than ImportError
        return f"vllm does not import here ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    if not torch.cuda.is_available():
        return "vllm imports, but there is no CUDA device"
    return None


def save_checkpoint(model: torch.nn.Module, processor, folder: Path) -> Path:
    """The target as a safetensors checkpoint vLLM can load."""
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


@dataclass
class VllmRun:
    settings: str
    seconds: list[float]  # per timed round
    outputs: list[list[int]]  # token ids per request, in request order

    @property
    def images_per_s(self) -> float:
        return len(self.outputs) / min(self.seconds)


def run_vllm(
    checkpoint: Path,
    prompts: list[tuple[str, Image.Image]],
    *,
    max_new_tokens: int,
    dtype: torch.dtype,
    rounds: int,
    max_num_seqs: int | None = None,
) -> VllmRun:
    """All prompts through one vLLM engine, `rounds` times after a warm-up on two; the best round counts.
    Call it after the GPU's other models are freed: vLLM takes a share of the memory free at its start."""
    from vllm import LLM, SamplingParams

    free, total = torch.cuda.mem_get_info()
    options = dict(
        model=str(checkpoint),
        dtype=str(dtype).removeprefix("torch."),
        gpu_memory_utilization=round(0.9 * free / total, 3),
        enable_prefix_caching=False,
        mm_processor_cache_gb=0,
        limit_mm_per_prompt={"image": 1},
        seed=0,
    )
    if max_num_seqs is not None:
        options["max_num_seqs"] = max_num_seqs
    llm = LLM(**options)
    # detokenize off: the random-weight targets' ids go past their small tokenizers' vocabularies.
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True, detokenize=False)
    inputs = [{"prompt": text, "multi_modal_data": {"image": image}} for text, image in prompts]
    llm.generate(inputs[:2], params, use_tqdm=False)
    seconds, outputs = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        done = llm.generate(inputs, params, use_tqdm=False)
        seconds.append(time.perf_counter() - start)
        outputs = [list(out.outputs[0].token_ids) for out in done]
    return VllmRun(f"vLLM plain, max_num_seqs {max_num_seqs or 'default'}", seconds, outputs)


@dataclass
class EngineSetting:
    """One measured engine setting, as the vLLM table compares it."""

    name: str  # e.g. "plain, compiled, cap 64"
    speculative: bool
    seconds: float  # its best round
    outputs: list[list[int]]


def versus_table(vllm: VllmRun, engine: list[EngineSetting], preprocess_seconds: float) -> str:
    """vLLM plain against the engine's best plain and best speculative setting (at any cap, eager or compiled).
    The baseline that counts is the better plain of the two engines."""
    images = len(vllm.outputs)

    def rate(setting: EngineSetting) -> float:
        return images / (setting.seconds + preprocess_seconds)

    best = {
        kind: max((s for s in engine if s.speculative == speculative), key=rate, default=None)
        for kind, speculative in (("plain", False), ("speculative", True))
    }
    plain_baseline = max(vllm.images_per_s, rate(best["plain"])) if best["plain"] else vllm.images_per_s
    rows = [(vllm.settings, vllm.images_per_s, vllm.outputs)]
    rows += [(f"engine best {kind}: {s.name}", rate(s), s.outputs) for kind, s in best.items() if s is not None]
    lines = [
        "| setting | images/s | vs vLLM plain | vs best plain (either engine) | same tokens as vLLM |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, images_per_s, outputs in rows:
        same = sum(a == b for a, b in zip(outputs, vllm.outputs)) / images
        lines.append(
            f"| {name} | {images_per_s:.2f} | {images_per_s / vllm.images_per_s:.2f}x | "
            f"{images_per_s / plain_baseline:.2f}x | {same:.0%} |"
        )
    spread = max(vllm.seconds) / min(vllm.seconds)
    lines += [
        "",
        f"Images/s of the best round ({len(vllm.seconds)} rounds; vLLM's rounds spread {spread:.2f}x, median "
        f"{images / statistics.median(vllm.seconds):.2f} images/s). The engine's images/s add its requests' "
        f"preprocessing, {preprocess_seconds:.2f} s, which vLLM does inside generate. Same tokens: in bf16 neither "
        "engine is batch-invariant, so departures from vLLM are rounding, not a loss of the engine's guarantee.",
    ]
    if best["speculative"] is not None:
        answer = "yes" if rate(best["speculative"]) > vllm.images_per_s else "no"
        lines.append(f"\nFaster than vLLM plain: {answer} ({rate(best['speculative']) / vllm.images_per_s:.2f}x).")
    return "\n".join(lines)
