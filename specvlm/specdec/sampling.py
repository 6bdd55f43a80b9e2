"""Turning logits into the distributions that drafting and verification compare.

Speculative sampling is exact for whatever distribution the target would sample from, so temperature, top-k
and top-p are applied identically to draft and target logits (same order as Hugging Face: temperature, then
top-k, then top-p). Randomness comes in as pre-drawn uniforms, one generator per request, so that a request's
output depends on its own seed and not on which other requests share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class SamplingParams:
    __pydantic_config__: ClassVar[dict] = {"extra": "forbid"}  # unknown keys in a job config are errors

    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., V] logits -> [..., V] float32 probabilities after temperature, top-k and top-p."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already cover top_p; the top token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample_from(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: [..., V] probabilities (need not sum to 1) and [...] uniforms -> [...] token ids.

    The cumulative sum runs in float64: in float32, once it nears 1 a token below half its ulp (3e-8) adds nothing
    to it and is never drawn, and in a vocabulary of 10^5 tokens such tokens can hold a visible share of the mass.
    """
    cdf = probs.double().cumsum(-1)
    target = uniforms.double().unsqueeze(-1) * cdf[..., -1:]
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # Guard against float round-off at the top end of the cdf.
    return tokens.clamp_(max=probs.shape[-1] - 1)


class RowRandom:
    """One seeded generator per row; every step each row draws the same count of uniforms.

    Uniforms are float64. A float32 uniform takes 2^24 values, which would quantise every acceptance test to 6e-8
    and cap a Gumbel key (tree.py) at 16.6 nats, so that no token 19 nats below the top could ever be drawn first.
    """

    def __init__(self, seeds: list[int], device: torch.device):
        self.device = device
        self.generators = [self._generator(seed) for seed in seeds]

    def _generator(self, seed: int) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        return generator

    def seed_row(self, row: int, seed: int) -> None:
        """A new request takes the row: it starts its own sequence."""
        self.generators[row] = self._generator(seed)

    def resize(self, rows: int) -> None:
        self.generators = (self.generators + [self._generator(0) for _ in range(rows)])[:rows]

    def uniforms(self, n: int, count: int) -> torch.Tensor:  # [n, count]
        return torch.stack(
            [torch.rand(count, generator=g, device=self.device, dtype=torch.float64) for g in self.generators[:n]]
        )

    def move_rows(self, dst: list[int], src: list[int]) -> None:
        for d, s in zip(dst, src):
            self.generators[d] = self.generators[s]
