"""Per-sample acceptance metrics, and the one way to pool them over many samples.

The field names are the Parquet column names of the pipeline's output.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field


@dataclass
class SampleMetrics:
    new_tokens: int = 0
    target_calls: int = 0  # verification passes; the prefill is not counted
    draft_calls: int = 0  # draft forward passes (0 for prompt lookup)
    proposed_tokens: int = 0  # draft tokens verified (for a tree: its nodes)
    accepted_tokens: int = 0
    accepted_per_step: list[int] = field(default_factory=list)  # accepted depth at each step
    nodes_per_step: list[int] = field(default_factory=list)  # draft nodes verified at each step (chain: its length)
    latency_s: float = 0.0  # from the request's prefill (it joins the running batch) to its last token
    cost_ratio: float = 0.0  # c: draft/target decode parameters (the memory-bound cost of a draft forward)

    @property
    def block_efficiency(self) -> float:
        """tau: tokens committed per target pass (at most depth + 1 for a chain)."""
        return self.new_tokens / self.target_calls if self.target_calls else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens over verified draft tokens (for a tree: accepted path length over its nodes)."""
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else 0.0

    @property
    def mbsu(self) -> float:
        """Memory-bound speedup: tokens per unit of cost, a target forward costing 1 and a draft forward c.

        With gamma draft forwards per step this is exactly tau / (gamma * c + 1) (Gagrani et al., "On Speculative
        Decoding for Multimodal Large Language Models"); counting the draft forwards actually made keeps it
        honest when chains stop early, rows finish mid-chain, or steps are taken without drafting.
        """
        cost = self.target_calls + self.cost_ratio * self.draft_calls
        return self.new_tokens / cost if cost else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.latency_s if self.latency_s > 0 else 0.0

    def as_row(self) -> dict:
        row = asdict(self)
        del row["cost_ratio"]
        row.update(
            block_efficiency=self.block_efficiency,
            acceptance_rate=self.acceptance_rate,
            mbsu=self.mbsu,
            tokens_per_s=self.tokens_per_s,
        )
        return row


COUNTS = ("new_tokens", "target_calls", "draft_calls", "proposed_tokens", "accepted_tokens")


@dataclass(frozen=True)
class Pooled:
    """Metrics of many samples together: sums of the counts, and the ratios of those sums (not means of
    per-sample ratios, which would weigh a 3-token answer like a 60-token caption)."""

    samples: int
    new_tokens: int
    target_calls: int
    draft_calls: int
    proposed_tokens: int
    accepted_tokens: int

    @property
    def block_efficiency(self) -> float:
        return self.new_tokens / self.target_calls if self.target_calls else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else 0.0

    @property
    def draft_calls_per_step(self) -> float:
        return self.draft_calls / self.target_calls if self.target_calls else 0.0


def pool(samples: Iterable[SampleMetrics | Mapping]) -> Pooled:
    """Pool per-sample metrics: SampleMetrics, or rows (dicts) with the output's count columns; rows whose
    counts are null (error rows) count as zero."""
    totals = dict.fromkeys(COUNTS, 0)
    count = 0
    for sample in samples:
        get = sample.get if isinstance(sample, Mapping) else lambda name, s=sample: getattr(s, name)
        for name in COUNTS:
            totals[name] += get(name) or 0
        count += 1
    return Pooled(samples=count, **totals)
