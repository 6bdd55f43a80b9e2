"""Side-by-side speed and identity of every decoding mode on the same models and inputs, in one process.

Modes: this engine autoregressive (the baseline), this engine with each draft strategy, Hugging Face batched
greedy `generate`, and Hugging Face assisted generation (batch 1). Every mode decodes the same requests; each
is timed as the median of `repeats` runs after a warm-up, and its output is compared token by token with the
engine's autoregressive output. Ratios are taken within one batch size.

Replay rows measure the engine's own overhead: a draft that costs nothing replays the target's recorded
continuation, corrupted so that each token is accepted with probability a; the achieved speedup over
autoregressive decoding is compared with the analytic limit tau / (gamma * c + 1), c measured.

That limit assumes a target pass over gamma + 1 tokens costs what a pass over one does. Where it does not (a
small model on a CPU is bound by arithmetic, not by reading its weights), r, the measured cost of the step's
verification pass relative to a one-token pass, gives the limit this hardware allows: tau / (r + calls * c),
calls = draft forwards per step. achieved / that limit is the engine's own efficiency.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from specvlm.data.images import decode_image
from specvlm.data.prompts import instruction, render
from specvlm.data.sources import list_shards, read_shard
from specvlm.evaluation.baselines import draft_forward_time, forward_time, hf_generate
from specvlm.evaluation.replay import ReplayDraft
from specvlm.specdec.decode import DecodeConfig, SpeculativeDecoder
from specvlm.specdec.drafts import Draft
from specvlm.specdec.requests import Request


@dataclass
class Row:
    mode: str
    batch: int
    seconds: float
    new_tokens: int
    identical: float  # fraction of requests token-identical to the engine's autoregressive output
    tau: float | None = None
    acceptance: float | None = None
    c: float | None = None
    limit: float | None = None  # tau / (gamma * c + 1)
    r: float | None = None  # cost of the step's verification pass / a one-token pass
    hardware_limit: float | None = None  # tau / (r + draft calls per step * c)
    speedup_vs_ar: float | None = None
    speedup_vs_hf: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds


def _median_time(run: Callable[[], list], repeats: int) -> tuple[list, float]:
    run()  # warm-up: allocator, kernels, caches
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def _engine(target, draft: Draft | None, config: DecodeConfig, requests: list[Request], batch: int):
    decoder = SpeculativeDecoder(target, draft, config)
    return [r for i in range(0, len(requests), batch) for r in decoder.generate(requests[i : i + batch])]


def _identity(outputs: list[list[int]], reference: list[list[int]]) -> float:
    return sum(a == b for a, b in zip(outputs, reference)) / len(reference)


def run_suite(
    target,
    drafts: dict[str, tuple[Callable[[], Draft], int]],  # name -> (make a fresh draft, gamma)
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
    log=print,
) -> list[Row]:
    rows: list[Row] = []
    base = DecodeConfig(max_new_tokens=max_new_tokens, eos_token_ids=eos)
    for batch in batches:
        one_token = forward_time(target, requests[:batch], True)  # the unit of c and r at this batch size
        r_of = {}  # tokens per verification pass -> r

        def r_for(metrics) -> float:
            nodes = [n for m in metrics for n in m.nodes_per_step]
            q = round(sum(nodes) / len(nodes)) + 1 if nodes else 1
            if q not in r_of:
                r_of[q] = forward_time(target, requests[:batch], True, q) / one_token
            return r_of[q]

        ar, ar_time = _median_time(lambda: _engine(target, None, base, requests, batch), repeats)
        reference = [r.tokens for r in ar]
        ar_row = Row("engine autoregressive", batch, ar_time, sum(len(t) for t in reference), 1.0, tau=1.0)
        hf, hf_time = _median_time(
            lambda: hf_generate(target, requests, max_new_tokens, batch, eos, pad_id)[0], repeats
        )
        hf_row = Row("HF generate (greedy)", batch, hf_time, sum(len(t) for t in hf), _identity(hf, reference))
        batch_rows = [ar_row, hf_row]
        log(f"batch {batch}: autoregressive {ar_row.tokens_per_s:.1f} tok/s, HF generate {hf_row.tokens_per_s:.1f}")

        for name, (make, gamma) in drafts.items():
            config = DecodeConfig(max_new_tokens=max_new_tokens, gamma=gamma, eos_token_ids=eos)
            out, seconds = _median_time(lambda: _engine(target, make(), config, requests, batch), repeats)
            metrics = [r.metrics for r in out]
            tau = sum(m.new_tokens for m in metrics) / sum(m.target_calls for m in metrics)
            proposed = sum(m.proposed_tokens for m in metrics)
            draft = make()
            has_model = hasattr(draft, "model")
            c = 0.0
            if has_model:
                c = draft_forward_time(target, draft.model, requests[:batch], draft.lean) / one_token
            per_step = sum(m.draft_calls for m in metrics) / sum(m.target_calls for m in metrics)
            r_verify = r_for(metrics)
            batch_rows.append(
                Row(
                    f"engine {name}",
                    batch,
                    seconds,
                    sum(m.new_tokens for m in metrics),
                    _identity([r.tokens for r in out], reference),
                    tau=tau,
                    acceptance=sum(m.accepted_tokens for m in metrics) / proposed if proposed else 0.0,
                    c=c,
                    limit=tau / (per_step * c + 1),
                    r=r_verify,
                    hardware_limit=tau / (r_verify + per_step * c),
                )
            )
            log(f"  {name}: tau {tau:.2f}, {batch_rows[-1].tokens_per_s:.1f} tok/s")

        if batch == 1:
            for name, assistant in assistants.items():
                out, seconds = _median_time(
                    lambda: hf_generate(target, requests, max_new_tokens, 1, eos, pad_id, assistant=assistant)[0],
                    repeats,
                )
                batch_rows.append(
                    Row(f"HF assisted ({name})", 1, seconds, sum(len(t) for t in out), _identity(out, reference))
                )

        vocab = target.get_output_embeddings().weight.shape[0]
        for acceptance in replay_acceptance:
            config = DecodeConfig(max_new_tokens=max_new_tokens, gamma=replay_gamma, eos_token_ids=eos)

            def replayed():
                # The replay draft holds one recorded continuation per request of the batch it decodes.
                results = []
                for i in range(0, len(requests), batch):
                    draft = ReplayDraft(
                        reference[i : i + batch],
                        error_rate=1 - acceptance,
                        vocab_size=vocab,
                        device=target.device,
                        seed=i,
                    )
                    results += SpeculativeDecoder(target, draft, config).generate(requests[i : i + batch])
                return results

            out, seconds = _median_time(replayed, repeats)
            metrics = [r.metrics for r in out]
            tau = sum(m.new_tokens for m in metrics) / sum(m.target_calls for m in metrics)
            r_verify = r_for(metrics)
            batch_rows.append(
                Row(
                    f"replay a={acceptance}",
                    batch,
                    seconds,
                    sum(m.new_tokens for m in metrics),
                    _identity([r.tokens for r in out], reference),
                    tau=tau,
                    c=0.0,
                    limit=tau,
                    r=r_verify,
                    hardware_limit=tau / r_verify,
                    acceptance=sum(m.accepted_tokens for m in metrics) / sum(m.proposed_tokens for m in metrics),
                )
            )

        for row in batch_rows:
            row.speedup_vs_ar = row.tokens_per_s / ar_row.tokens_per_s
            row.speedup_vs_hf = row.tokens_per_s / hf_row.tokens_per_s
        rows += batch_rows
    return rows


def markdown_table(rows: list[Row]) -> str:
    def fmt(x, spec=".2f"):
        return "" if x is None else format(x, spec)

    lines = [
        "| batch | mode | tok/s vs engine AR | tok/s vs HF generate | tau | acceptance | c | limit tau/(γc+1) | "
        "achieved / limit | r | limit tau/(r+γc) | achieved / that limit | identical |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        efficiency = r.speedup_vs_ar / r.limit if r.limit else None
        hardware = r.speedup_vs_ar / r.hardware_limit if r.hardware_limit else None
        lines.append(
            f"| {r.batch} | {r.mode} | {fmt(r.speedup_vs_ar)} | {fmt(r.speedup_vs_hf)} | {fmt(r.tau)} | "
            f"{fmt(r.acceptance)} | {fmt(r.c, '.3f')} | {fmt(r.limit)} | {fmt(efficiency, '.0%')} | "
            f"{fmt(r.r)} | {fmt(r.hardware_limit)} | {fmt(hardware, '.0%')} | {r.identical:.0%} |"
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
