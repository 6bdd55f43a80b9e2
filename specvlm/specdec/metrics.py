"""Per-sample acceptance metrics; the field names are the Parquet column names (design.md, section 3)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class SampleMetrics:
    new_tokens: int = 0
    target_calls: int = 0  # verification passes; the prefill is not counted
    draft_calls: int = 0  # draft forward passes (0 for prompt lookup)
    proposed_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_step: list[int] = field(default_factory=list)  # accepted depth at each step
    nodes_per_step: list[int] = field(default_factory=list)  # draft nodes verified at each step (chain: its length)
    latency_s: float = 0.0  # from the start of the batch (prefill included) to this sample's last token
    cost_ratio: float = 0.0  # c: cost of one draft forward relative to one target forward

    @property
    def block_efficiency(self) -> float:
        """tau: tokens committed per target pass (at most gamma + 1 for a chain)."""
        return self.new_tokens / self.target_calls if self.target_calls else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else 0.0

    @property
    def mbsu(self) -> float:
        """Memory-bound speedup: tokens per unit of cost, a target forward costing 1 and a draft forward c.

        With gamma draft forwards per step this is exactly tau / (gamma * c + 1) (paper 002); counting the
        draft forwards actually made keeps it honest when chains stop early or rows finish mid-chain.
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
