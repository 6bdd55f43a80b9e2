"""Compiled against eager decode steps (`compute.compile`), engine level, side by side at each running-batch cap.

Each setting (plain decoding, or a draft) decodes the same requests at one cap twice per round, eagerly and
compiled, the two taking turns; the best round counts. Compiled forwards are kept on the model, so the first
compiled round pays the compile (reported apart as warm-up) and later rounds run warm. What "compiled" means is
the engine's own choice for the device (specvlm/specdec/compiled.py): inductor with frozen weights on a CPU,
CUDA graphs (mode "reduce-overhead") over bucketed shapes on a GPU. Outputs are compared token by token: compiled
decoding must give exactly what eager decoding gives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from specvlm.evaluation.throughput import Run, decode, take_turns
from specvlm.specdec.drafts import Draft
from specvlm.specdec.requests import Request

TABLE_HEADER = [
    "| cap | decoding | eager tok/s | compiled tok/s | compiled / eager | identical | first round's extra s |",
    "|---:|---|---:|---:|---:|---|---:|",
]


@dataclass
class Comparison:
    eager: Run
    compiled: Run

    @property
    def speedup(self) -> float:
        return self.compiled.tokens_per_s / self.eager.tokens_per_s

    @property
    def identical(self) -> bool:
        return [r.tokens for r in self.eager.results] == [r.tokens for r in self.compiled.results]

    @property
    def warm_up_seconds(self) -> float:
        """What the first compiled round took beyond the best one: it compiles whatever graphs are new."""
        return self.compiled.seconds[0] - min(self.compiled.seconds)

    @property
    def fell_back(self) -> str | None:
        """Why compiling failed (the compiled run then decoded eagerly), or None."""
        return self.compiled.describe["compile"]["fell_back_to_eager"]

    @property
    def backend(self) -> str:
        return self.compiled.describe["compile"]["backend"]

    def table_row(self) -> str:
        return (
            f"| {self.eager.cap} | {self.eager.name} | {self.eager.tokens_per_s:.0f} | "
            f"{self.compiled.tokens_per_s:.0f} | {self.speedup:.2f}x | {'yes' if self.identical else 'NO'} | "
            f"{self.warm_up_seconds:.1f} |"
        )


def compare(
    target,
    drafts: dict[str, Callable[[], Draft] | None],  # name -> make a fresh draft (None: plain decoding)
    requests: list[Request],
    caps: tuple[int, ...],
    *,
    max_new_tokens: int,
    eos: tuple[int, ...],
    rounds: int,
) -> Iterator[Comparison]:
    """One Comparison per cap and setting, as each is measured (a long run that dies keeps what it yielded)."""
    if rounds < 2:
        raise ValueError(f"compiled against eager needs 2 or more rounds (the first compiles), got {rounds}")
    for cap in caps:
        for name, make in drafts.items():
            runs = {
                mode: lambda cap=cap, make=make, compiled=compiled: decode(
                    target,
                    make() if make else None,
                    requests,
                    cap,
                    max_new_tokens=max_new_tokens,
                    eos=eos,
                    compile=compiled,
                )
                for mode, compiled in (("eager", False), ("compiled", True))
            }
            out = {mode: Run(name, cap, *measured) for mode, measured in take_turns(runs, rounds).items()}
            yield Comparison(out["eager"], out["compiled"])
