"""Side-by-side speed and identity of every decoding mode on the same models and inputs, in one process.

Modes: this engine autoregressive (the baseline), this engine with each draft, Hugging Face batched greedy
`generate`, and Hugging Face assisted generation (batch 1). Every mode decodes the same requests; the modes take
turns, `repeats` rounds after a warm-up, so that drift on a shared machine hits them alike, and each is timed as
the median of its rounds (the spread, max/min, is reported beside it). Outputs are compared token by token
with the engine's autoregressive output. Ratios are taken within one batch size. Drafts run at their full depth
every step (the controller's adaptivity has its own benchmark, throughput.py): this measures what a draft buys.
Engine modes are also timed over their decoding steps alone, without admission (prefill): the analytic limits
below are limits of decoding, and with short outputs an image's prefill, which speculation cannot shorten,
would hide how close the loop comes to them.

Replay rows measure the engine's own overhead: a draft that costs nothing replays the target's recorded
continuation, corrupted so that each token is accepted with probability a; the achieved speedup over
autoregressive decoding is compared with the analytic limit tau / (gamma * c + 1), c measured.

That limit assumes a target pass over gamma + 1 tokens costs what a pass over one does. Where it does not (a
small model on a CPU is bound by arithmetic, not by reading its weights), r, the measured cost of the step's
verification pass relative to a one-token pass, gives the limit this hardware allows: tau / (r + calls * c),
calls = draft forwards per step. achieved / that limit is the engine's own efficiency.

Figures that cannot be right are flagged rather than printed silently: r below 1 beyond noise (a pass over more
tokens cheaper than a pass over one), an achieved speedup above its limit, and timings whose rounds disagree by
more than SPREAD_WARNING.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from specvlm.data.images import decode_image
from specvlm.data.prompts import instruction, render
from specvlm.data.sources import list_shards, read_shard
from specvlm.evaluation.baselines import draft_forward_time, forward_time, hf_generate
from specvlm.evaluation.countdown import RunCounter
from specvlm.evaluation.replay import ReplayDraft, record_scripts
from specvlm.specdec.decode import DecodeConfig, SpeculativeDecoder
from specvlm.specdec.drafts import Draft
from specvlm.specdec.metrics import pool
from specvlm.specdec.requests import Request

SPREAD_WARNING = 1.25  # max / min of a mode's rounds above this: the machine was too busy to trust its ratio
TOLERANCE = 0.05  # how far a measured ratio may pass a bound it cannot pass before it is flagged


@dataclass
class Timing:
    """Seconds of each timed round, and for engine modes the seconds of its decoding steps."""

    rounds: list[float]
    decoding: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)

    @property
    def decoding_median(self) -> float | None:
        return statistics.median(self.decoding) if self.decoding else None

    @property
    def spread(self) -> float:
        return max(self.rounds) / min(self.rounds)


@dataclass
class Row:
    mode: str
    batch: int
    timing: Timing
    new_tokens: int
    identical: float  # fraction of requests token-identical to the engine's autoregressive output
    tau: float | None = None
    acceptance: float | None = None
    c: float | None = None
    limit: float | None = None  # tau / (calls * c + 1)
    r: float | None = None  # cost of the step's verification pass / a one-token pass
    hardware_limit: float | None = None  # tau / (r + draft calls per step * c)
    speedup_vs_ar: float | None = None
    speedup_vs_hf: float | None = None
    decoding_speedup_vs_ar: float | None = None  # tokens per second of decoding steps alone
    flags: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.timing.median

    def check(self) -> None:
        """Flag figures that cannot be right."""
        if self.timing.spread > SPREAD_WARNING:
            self.flags.append(f"noisy: rounds differ {self.timing.spread:.2f}x")
        if self.r is not None and self.r < 1 - TOLERANCE:
            self.flags.append(f"r = {self.r:.2f} < 1: a longer pass measured cheaper (a busy machine?)")
        for name, bound in (("limit", self.limit), ("hardware limit", self.hardware_limit)):
            speedup = max(self.speedup_vs_ar or 0.0, self.decoding_speedup_vs_ar or 0.0)
            if bound and speedup > bound * (1 + TOLERANCE):
                self.flags.append(f"above its {name} ({speedup:.2f}x > {bound:.2f}x)")
        if self.identical < 1.0 and not self.mode.startswith("HF"):
            self.flags.append("OUTPUT DIFFERS from the target's")


def _engine(target, draft: Draft | None, requests: list[Request], batch: int, max_new_tokens: int, eos):
    """Static batches of `batch` requests, as the classic speculative decoding papers measure. Returns the
    results and the seconds spent in decoding steps."""
    config = DecodeConfig(max_new_tokens=max_new_tokens, eos_token_ids=eos, max_rows=batch, adaptive=False)
    decoder = SpeculativeDecoder(target, draft, config)
    results = [r for i in range(0, len(requests), batch) for r in decoder.generate(requests[i : i + batch])]
    return results, decoder.seconds["decoding"]


def _identity(outputs: list[list[int]], reference: list[list[int]]) -> float:
    return sum(a == b for a, b in zip(outputs, reference)) / len(reference)


def _timed_rounds(
    modes: dict[str, Callable[[], tuple]], repeats: int, counter: RunCounter, batch: int
) -> tuple[dict[str, list], dict[str, Timing]]:
    """Each mode once to warm up, then `repeats` rounds in which every mode runs once, in turn. A mode returns
    its outputs and the seconds of its decoding steps (None where it cannot tell)."""
    outputs = {}
    for name, run in modes.items():
        counter.start(f"{name}, batch {batch}, warm-up")
        outputs[name] = run()[0]
    timings = {name: Timing([]) for name in modes}
    for round_ in range(repeats):
        for name, run in modes.items():
            counter.start(f"{name}, batch {batch}, round {round_ + 1}/{repeats}")
            start = time.perf_counter()
            outputs[name], decoding = run()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            timings[name].rounds.append(time.perf_counter() - start)
            if decoding is not None:
                timings[name].decoding.append(decoding)
    return outputs, timings


def run_suite(
    target,
    drafts: dict[str, Callable[[], Draft]],  # name -> make a fresh draft
    assistants: dict[str, torch.nn.Module],  # name -> draft model for HF assisted generation
    requests: list[Request],
    *,
    max_new_tokens: int,
    eos: tuple[int, ...],
    pad_id: int,
    batches: tuple[int, ...] = (1, 8),
    repeats: int = 3,
    replay_acceptance: tuple[float, ...] = (0.5, 0.7, 0.9),
    replay_gamma: int = 5,
    replay_trees: tuple[int, ...] = (),
    log=print,
) -> list[Row]:
    """replay_trees: sibling counts of replayed trees (acceptance 0.9), which exercise tree verification. `log`
    gets "run N/M: ..." before each mode's warm-up and each of its timed rounds, and each row's speedup."""

    def modes_at(batch: int) -> int:  # as _rows_at makes them: two baselines, drafts, HF assisted, replays
        return 2 + len(drafts) + (len(assistants) if batch == 1 else 0) + len(replay_acceptance) + len(replay_trees)

    counter = RunCounter(sum(modes_at(b) for b in batches) * (1 + repeats), log)
    rows: list[Row] = []
    for batch in batches:
        rows += _rows_at(
            target,
            drafts,
            assistants if batch == 1 else {},
            requests,
            batch,
            max_new_tokens,
            eos,
            pad_id,
            repeats,
            replay_acceptance,
            replay_gamma,
            replay_trees,
            counter,
        )
    return rows


def _rows_at(
    target,
    drafts,
    assistants,
    requests,
    batch,
    max_new_tokens,
    eos,
    pad_id,
    repeats,
    replay_acceptance,
    replay_gamma,
    replay_trees,
    counter: RunCounter,
) -> list[Row]:
    """Every mode at one batch size."""
    counter.log(f"batch {batch}: timing a one-token pass and decoding the reference (the target alone)")
    one_token = forward_time(target, requests[:batch], True)  # the unit of c and r at this batch size
    reference = [r.tokens for r in _engine(target, None, requests, batch, max_new_tokens, eos)[0]]
    scripts = record_scripts(requests, reference)
    vocab = target.get_output_embeddings().weight.shape[0]
    made = {name: make() for name, make in drafts.items()}

    def engine(draft):
        return lambda: _engine(target, draft, requests, batch, max_new_tokens, eos)

    modes: dict[str, Callable[[], tuple]] = {
        "engine autoregressive": engine(None),
        "HF generate (greedy)": lambda: (hf_generate(target, requests, max_new_tokens, batch, eos, pad_id)[0], None),
    }
    for name, draft in made.items():
        modes[f"engine {name}"] = engine(draft)
    for name, assistant in assistants.items():
        modes[f"HF assisted ({name})"] = lambda a=assistant: (
            hf_generate(target, requests, max_new_tokens, 1, eos, pad_id, assistant=a)[0],
            None,
        )
    for a in replay_acceptance:
        modes[f"replay a={a}"] = engine(
            ReplayDraft(scripts, error_rate=1 - a, target_vocab=vocab, device=target.device, gamma=replay_gamma)
        )
    for k in replay_trees:
        modes[f"replay tree a=0.9, {k} siblings"] = engine(
            ReplayDraft(
                scripts, error_rate=0.1, target_vocab=vocab, device=target.device, gamma=replay_gamma, siblings=k
            )
        )
    outputs, timings = _timed_rounds(modes, repeats, counter, batch)

    r_of: dict[int, float] = {}  # tokens per verification pass -> r

    def r_for(metrics) -> float:
        nodes = [n for m in metrics for n in m.nodes_per_step]
        q = round(sum(nodes) / len(nodes)) + 1 if nodes else 1
        if q not in r_of:
            r_of[q] = forward_time(target, requests[:batch], True, q) / one_token
        return r_of[q]

    rows = []
    for name, out in outputs.items():
        tokens = [r if isinstance(r, list) else r.tokens for r in out]
        row = Row(name, batch, timings[name], sum(map(len, tokens)), _identity(tokens, reference))
        if name.startswith(("engine", "replay")):
            pooled = pool(r.metrics for r in out)
            row.tau, row.acceptance = pooled.block_efficiency, pooled.acceptance_rate
            draft = made.get(name.removeprefix("engine "))
            model = getattr(draft, "model", None)
            row.c = 0.0
            if model is not None:
                row.c = draft_forward_time(target, model, requests[:batch], draft.lean) / one_token
            calls = pooled.draft_calls_per_step
            row.limit = row.tau / (calls * row.c + 1)
            if name != "engine autoregressive":
                row.r = r_for([r.metrics for r in out])
                row.hardware_limit = row.tau / (row.r + calls * row.c)
        rows.append(row)
    ar, hf = rows[0], rows[1]
    for row in rows:
        row.speedup_vs_ar = row.tokens_per_s / ar.tokens_per_s
        row.speedup_vs_hf = row.tokens_per_s / hf.tokens_per_s
        if row.timing.decoding and ar.timing.decoding:
            row.decoding_speedup_vs_ar = (row.new_tokens / row.timing.decoding_median) / (
                ar.new_tokens / ar.timing.decoding_median
            )
        row.check()
        flags = "".join(f" [{f}]" for f in row.flags)
        counter.log(f"batch {batch}: {row.mode}: {row.speedup_vs_ar:.2f}x autoregressive{flags}")
    return rows


def markdown_table(rows: list[Row]) -> str:
    def fmt(x, spec=".2f"):
        return "" if x is None else format(x, spec)

    lines = [
        "| batch | mode | tok/s vs engine AR | tok/s vs HF generate | spread | tau | acceptance | c | "
        "limit tau/(γc+1) | achieved / limit | decoding alone vs AR | decoding alone / limit | r | "
        "limit tau/(r+γc) | achieved / that limit | identical | flags |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        efficiency = r.speedup_vs_ar / r.limit if r.limit else None
        decoding = r.decoding_speedup_vs_ar / r.limit if r.limit and r.decoding_speedup_vs_ar else None
        hardware = r.speedup_vs_ar / r.hardware_limit if r.hardware_limit else None
        lines.append(
            f"| {r.batch} | {r.mode} | {fmt(r.speedup_vs_ar)} | {fmt(r.speedup_vs_hf)} | {r.timing.spread:.2f} | "
            f"{fmt(r.tau)} | {fmt(r.acceptance)} | {fmt(r.c, '.3f')} | {fmt(r.limit)} | {fmt(efficiency, '.0%')} | "
            f"{fmt(r.decoding_speedup_vs_ar)} | {fmt(decoding, '.0%')} | {fmt(r.r)} | {fmt(r.hardware_limit)} | "
            f"{fmt(hardware, '.0%')} | {r.identical:.0%} | {'; '.join(r.flags)} |"
        )
    return "\n".join(lines)


def caption_requests(target, shards: str, count: int) -> list[Request]:
    """The first `count` readable images of `shards` as caption requests, through the target's processor."""
    requests = []
    for shard in list_shards(shards):
        for record in read_shard(shard):
            if record["error"] is None and len(requests) < count:
                prompt = render(instruction("caption", record), target.processor)
                enc = target.processor(images=decode_image(record["image"]), text=prompt, return_tensors="pt")
                requests.append(Request(enc.input_ids[0].tolist(), enc.pixel_values))
    return requests
