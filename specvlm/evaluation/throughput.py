"""Throughput under load, engine level: what a bulk-captioning user gets at each batch size, side by side.

Two measurements, each as ratios from runs that take turns in one process:

- caps: at every running-batch cap, plain decoding (no draft) against the default speculative engine (the
  draft at gamma auto, the controller choosing each step's depth) and against fixed-depth chains, plus the fully
  automatic setting (batch size found by measurement). The baseline that counts is the best plain cap.
- continuous vs static: the same cap, requests of widely varying output lengths (short answers mixed with
  captions); static batching decodes fixed groups of `cap` requests, each group waiting for its slowest row.

The jobs run these on the demo family's held-out requests (demo_family.py) and on random-weight targets of real
size (jobs/gpu_benchmark.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from specvlm.specdec.decode import DecodeConfig, SpeculativeDecoder
from specvlm.specdec.drafts import Draft
from specvlm.specdec.metrics import pool
from specvlm.specdec.requests import Request, Result


@dataclass
class Run:
    name: str
    cap: int | None  # None: found by measurement
    seconds: list[float]
    results: list[Result]
    describe: dict

    @property
    def tokens(self) -> int:
        return sum(len(r.tokens) for r in self.results)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / min(self.seconds)  # the best round: the least disturbed by the machine


def decode(
    target,
    draft: Draft | None,
    requests: list[Request],
    cap: int | None,
    *,
    max_new_tokens: int,
    eos: tuple[int, ...],
    adaptive: bool = True,
    static: bool = False,
    compile: bool = False,
    max_batch_tokens: int | None = None,
    share_prefill: bool = True,
) -> tuple[list[Result], dict]:
    """All requests through one engine: continuously (waiting requests join as rows finish), or static groups
    of `cap` requests, each decoded to its last row before the next group starts."""
    config = DecodeConfig(
        max_new_tokens=max_new_tokens,
        eos_token_ids=eos,
        max_rows=cap,
        max_batch_tokens=max_batch_tokens,
        adaptive=adaptive,
        compile=compile,
        share_prefill=share_prefill,
    )
    engine = SpeculativeDecoder(target, draft, config)
    if not static:
        return engine.generate(requests), engine.describe()
    results = []
    for start in range(0, len(requests), cap):
        results += engine.generate(requests[start : start + cap])
    return results, engine.describe()


def take_turns(runs: dict[str, Callable[[], tuple[list[Result], dict]]], rounds: int) -> dict[str, tuple]:
    """Each run `rounds` times, the runs taking turns; returns name -> (seconds per round, results, describe)."""
    out = {name: ([], None, None) for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            results, describe = run()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds = out[name][0] + [time.perf_counter() - start]
            out[name] = (seconds, results, describe)
    return out


def cap_sweep(
    target,
    drafts: dict[str, Callable[[], Draft]],
    requests: list[Request],
    caps: tuple[int, ...],
    *,
    max_new_tokens: int,
    eos: tuple[int, ...],
    rounds: int = 2,
    max_batch_tokens: int | None = None,
    log=print,
) -> list[Run]:
    """drafts: name -> make a draft (adaptive unless the name says "fixed"); plain decoding is always included."""
    collected = []
    common = dict(max_new_tokens=max_new_tokens, eos=eos, max_batch_tokens=max_batch_tokens)
    for cap in (*caps, None):
        runs = {"plain": lambda cap=cap: decode(target, None, requests, cap, **common)}
        for name, make in drafts.items():
            adaptive = "fixed" not in name
            runs[name] = lambda cap=cap, make=make, adaptive=adaptive: decode(
                target, make(), requests, cap, adaptive=adaptive, **common
            )
        for name, (seconds, results, describe) in take_turns(runs, rounds).items():
            collected.append(Run(name, cap, seconds, results, describe))
        plain = next(r for r in collected if r.cap == cap and r.name == "plain")
        log(
            f"cap {cap or 'auto'}: plain {plain.tokens_per_s:.0f} tok/s; "
            + ", ".join(
                f"{r.name} {r.tokens_per_s / plain.tokens_per_s:.2f}x"
                for r in collected
                if r.cap == cap and r.name != "plain"
            )
        )
    return collected


def cap_table(runs: list[Run]) -> str:
    """Speculative tokens/s over plain at the same cap, and over the best plain cap of all."""
    best_plain = max((r for r in runs if r.name == "plain" and r.cap is not None), key=lambda r: r.tokens_per_s)
    names = list(dict.fromkeys(r.name for r in runs if r.name != "plain"))
    reference = next(r for r in runs if r.name == "plain" and r.cap == best_plain.cap).results
    lines = [
        f"Best plain cap: {best_plain.cap} rows, {best_plain.tokens_per_s:.0f} tokens/s.",
        "",
        "| cap | plain tok/s | plain vs best plain | "
        + " | ".join(f"{n}: vs plain same cap | {n}: vs best plain | {n}: tau" for n in names)
        + " | identical |",
        "|---:|---:|---:|" + "---:|---:|---:|" * len(names) + "---:|",
    ]
    for cap in dict.fromkeys(r.cap for r in runs):
        at = {r.name: r for r in runs if r.cap == cap}
        plain = at["plain"]
        cells = [
            f"{'auto' if cap is None else cap}",
            f"{plain.tokens_per_s:.0f}",
            f"{plain.tokens_per_s / best_plain.tokens_per_s:.2f}",
        ]
        same = all([x.tokens for x in r.results] == [x.tokens for x in reference] for r in at.values())
        for name in names:
            run = at[name]
            tau = pool(x.metrics for x in run.results).block_efficiency
            cells += [
                f"{run.tokens_per_s / plain.tokens_per_s:.2f}x",
                f"{run.tokens_per_s / best_plain.tokens_per_s:.2f}x",
                f"{tau:.2f}",
            ]
        cells.append("yes" if same else "NO")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def continuous_vs_static(
    target,
    make_draft: Callable[[], Draft | None],
    requests: list[Request],
    cap: int,
    *,
    max_new_tokens: int,
    eos: tuple[int, ...],
    rounds: int = 2,
) -> dict:
    runs = {
        mode: lambda static=(mode == "static"): decode(
            target, make_draft(), requests, cap, max_new_tokens=max_new_tokens, eos=eos, static=static
        )
        for mode in ("static", "continuous")
    }
    out = take_turns(runs, rounds)
    tokens = {mode: sum(len(r.tokens) for r in results) for mode, (_, results, _) in out.items()}
    best = {mode: min(seconds) for mode, (seconds, _, _) in out.items()}
    identical = [r.tokens for r in out["static"][1]] == [r.tokens for r in out["continuous"][1]]
    return {
        "cap": cap,
        "requests": len(requests),
        "output_lengths": sorted({len(r.tokens) for r in out["static"][1]}),
        "static_tokens_per_s": tokens["static"] / best["static"],
        "continuous_tokens_per_s": tokens["continuous"] / best["continuous"],
        "speedup": (tokens["continuous"] / best["continuous"]) / (tokens["static"] / best["static"]),
        "identical": identical,
    }
