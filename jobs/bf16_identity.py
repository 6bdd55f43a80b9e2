"""Losslessness in bf16, measured: how often speculative output departs from the target's own greedy decoding,
next to how often that decoding departs from itself at another batch size, with and without decode.float32_head.

In bf16 neither is batch-invariant: a verification pass over a window of tokens rounds differently from a
one-token pass, and `generate` at batch 64 rounds differently from `generate` at batch 1. Where the top two logits
are closer than that rounding, the two pick different tokens. This script measures, on one set of prompts:

  generate b64      `generate` 64 rows at a time, against `generate` one row at a time (the reference)
  engine plain      the engine without a draft (one-token passes), against the reference
  speculative       the engine with a replayed draft (the reference continuation itself, so every step verifies a
                    window of gamma + 1 tokens and any departure is the verifier's choice), against the reference
  ... float32 head  the same two with decode.float32_head (final norm and LM head in float32)

and for each departure whether it is a numeric tie: the margin between the reference's token and the departing
token, in float32 logits of the reference's own prefix at batch 1, below the bf16 rounding step at that logit
(a tie), or wider (a real mismatch, which a correct engine never shows).

The target is random: LLaVA-1.5's width (4096 hidden, 32 heads, 11008 intermediate, 32064-token vocabulary) at
--layers layers (1 by default, to keep 1,000 rows affordable on a CPU), text-only prompts of random tokens. A
random LM head puts the top logits of a 32k vocabulary close together, far more near-ties than a trained model;
--confidence adds to each token's head row a multiple of another token's embedding (a fixed random pairing), so
the model predicts that successor with a margin, and near-ties become rarer. The margin distribution is printed
with the rates, so a reader can judge how realistic the setting is.

    python jobs/bf16_identity.py --quick                 # 64 rows, a minute or two
    python jobs/bf16_identity.py --rows 1000 --out results/bf16.md
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script

from jobs.gpu_benchmark import SHAPES
from specvlm.evaluation.replay import ReplayDraft, record_scripts
from specvlm.models.build import build_llava, build_tokenizer
from specvlm.specdec.decode import DecodeConfig, SpeculativeDecoder
from specvlm.specdec.float32_head import Float32Head
from specvlm.specdec.requests import Request

VOCAB = 32064
MARGIN_EDGES = (0.0, 1 / 32, 0.1, 0.5, 1.0)  # logit margins the distribution is counted below
# A departure is a numeric tie when the two tokens' float32 logits lie within this many bf16 steps (the spacing at
# the top logit): rounding to bf16 keeps their order or ties them, so one step, plus the hidden states' own
# rounding between passes, is what a correct engine can show; a real mismatch lies far beyond.
TIE_STEPS = 2.0


def build_target(layers: int, confidence: float, seed: int = 0) -> torch.nn.Module:
    """A random bf16 LLaVA at LLaVA-1.5's width; token v's head row gains `confidence` times the embedding of the
    token it follows in a fixed random pairing."""
    shape = dataclasses.replace(SHAPES["wide"][0], layers=layers)
    tokenizer = build_tokenizer(["describe the image in detail please"], vocab_size=300)
    target, _ = build_llava(tokenizer, shape, seed=seed)
    target.resize_token_embeddings(VOCAB)
    generator = torch.Generator().manual_seed(seed)
    embed, head = target.get_input_embeddings().weight, target.get_output_embeddings().weight
    with torch.no_grad():
        # Resizing fills new rows from the old rows' mean and covariance (a 300-token subspace): drawn afresh.
        std = target.config.text_config.initializer_range
        embed.copy_(torch.randn(embed.shape, generator=generator) * std)
        head.copy_(torch.randn(head.shape, generator=generator) * std)
        successor = torch.randperm(VOCAB, generator=generator)  # token v predicts successor[v]
        head[successor] += confidence * embed
    target.generation_config.eos_token_id = None  # every row generates its full length
    return target.to(torch.bfloat16).eval()


def prompts(rows: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(300, VOCAB, (rows, length)).tolist()


@torch.inference_mode()
def generate(target, prompts: list[list[int]], new_tokens: int, batch: int):
    """Greedy `generate`, `batch` rows at a time (equal prompt lengths: no padding). Returns the tokens per row
    and, at batch 1, the top-1/top-2 margin of each step's logits."""
    tokens, margins = [], []
    for start in range(0, len(prompts), batch):
        ids = torch.tensor(prompts[start : start + batch])
        out = target.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        tokens += out.sequences[:, ids.shape[1] :].tolist()
        top = torch.stack(out.logits, 1).float().topk(2, dim=-1).values  # [rows, new_tokens, 2]
        margins += (top[..., 0] - top[..., 1]).flatten().tolist()
    return tokens, np.array(margins)


def engine(target, prompts, new_tokens: int, batch: int, reference, gamma: int, float32_head: bool):
    """The engine's output per row and its tokens/s; with `reference`, drafting by replaying it."""
    requests = [Request(p) for p in prompts]
    draft = None
    if reference is not None:
        draft = ReplayDraft(
            record_scripts(requests, reference), error_rate=0.0, target_vocab=VOCAB, device=target.device, gamma=gamma
        )
    config = DecodeConfig(
        max_new_tokens=new_tokens, eos_token_ids=(-1,), max_rows=batch, adaptive=False, float32_head=float32_head
    )
    decoder = SpeculativeDecoder(target, draft, config)
    start = time.perf_counter()
    results = decoder.generate(requests)
    seconds = time.perf_counter() - start
    return [r.tokens for r in results], sum(len(r.tokens) for r in results) / seconds


def first_departure(output: list[int], reference: list[int]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(output, reference)) if a != b), None)


def bf16_step(value: float) -> float:
    """The spacing of bf16 numbers (8 significant bits) at `value`."""
    return 2.0 ** (np.floor(np.log2(max(abs(value), 1e-30))) - 7)


@torch.inference_mode()
def classify(head: Float32Head, prompt, output, reference):
    """None where output follows reference; else (index, margin in bf16 steps) of its first departure: the float32
    logit margin of the reference's token over output's, given the reference's prefix at batch 1, in units of the
    bf16 spacing at the top logit."""
    index = first_departure(output, reference)
    if index is None:
        return None
    ids = torch.tensor([prompt + reference[:index]])
    logits = head(head.decoder(input_ids=ids).last_hidden_state[:, -1:])[0, -1]  # [vocab] float32
    margin = float(logits[reference[index]] - logits[output[index]])
    return index, abs(margin) / bf16_step(float(logits.max()))


def summarise(name: str, outputs, reference, prompt_ids, head) -> dict:
    departures = [d for d in map(classify, [head] * len(outputs), prompt_ids, outputs, reference) if d is not None]
    ties = sum(steps <= TIE_STEPS for _, steps in departures)
    return {
        "name": name,
        "rows": len(outputs),
        "departed": len(departures),
        "ties": ties,
        "real": len(departures) - ties,
        "steps": max((steps for _, steps in departures), default=None),
    }


def margin_table(margins: np.ndarray, step_at_max: float) -> str:
    lines = [
        "| top-1 − top-2 logit margin (batch-1 reference, every generated token) | share of tokens |",
        "|---|---|",
        f"| = 0 (a bf16 tie) | {np.mean(margins == 0):.2%} |",
    ]
    lines += [f"| ≤ {edge:g} | {np.mean(margins <= edge):.2%} |" for edge in MARGIN_EDGES[1:]]
    lines.append(f"| median | {np.median(margins):.3f} |")
    lines.append(f"| (bf16 step at the typical top logit: {step_at_max:g}) | |")
    return "\n".join(lines)


def rate_table(rows: list[dict], speeds: dict[str, float]) -> str:
    lines = [
        "| decoding | against | rows | departed | rate | numeric ties | real mismatches | widest margin at a "
        "departure (bf16 steps) | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        widest = "-" if r["steps"] is None else f"{r['steps']:.2f}"
        speed = f"{speeds[r['name']]:.0f}" if r["name"] in speeds else "-"
        lines.append(
            f"| {r['name']} | {r['against']} | {r['rows']} | {r['departed']} | {r['departed'] / r['rows']:.1%} | "
            f"{r['ties']} | {r['real']} | {widest} | {speed} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=12)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64, help="rows decoded together (generate and the engine)")
    parser.add_argument("--gamma", type=int, default=8, help="replayed draft depth: windows of gamma + 1 tokens")
    parser.add_argument("--confidence", type=float, default=4.0, help="see above; 0: a plain random head")
    parser.add_argument("--quick", action="store_true", help="64 rows of 8 tokens, to check the script")
    parser.add_argument("--out", type=Path, help="also write the tables to this Markdown file")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.new_tokens = 64, 8

    def stage(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    target = build_target(args.layers, args.confidence)
    head = Float32Head(target)
    prompt_ids = prompts(args.rows, args.prompt_length)
    stage(f"generate at batch 1, {args.rows} rows x {args.new_tokens} tokens")
    reference, margins = generate(target, prompt_ids, args.new_tokens, 1)
    stage(f"generate at batch {args.batch}")
    outputs = {f"generate, batch {args.batch}": generate(target, prompt_ids, args.new_tokens, args.batch)[0]}
    speeds = {}
    for float32_head in (False, True):
        suffix = ", float32 head" if float32_head else ""
        for label, replay in (("engine plain", None), (f"speculative γ={args.gamma}", reference)):
            name = f"{label}, batch {args.batch}{suffix}"
            stage(name)
            outputs[name], speeds[name] = engine(
                target, prompt_ids, args.new_tokens, args.batch, replay, args.gamma, float32_head
            )
    stage("classifying departures")
    reference_name = "generate, batch 1"
    comparisons = [(name, reference_name) for name in outputs]
    # Window passes against one-token passes of the same engine and head: what the float32 head is for.
    for suffix in ("", ", float32 head"):
        comparisons.append(
            (f"speculative γ={args.gamma}, batch {args.batch}{suffix}", f"engine plain, batch {args.batch}{suffix}")
        )
    outputs[reference_name] = reference
    rows = []
    for name, against in comparisons:
        rows.append({**summarise(name, outputs[name], outputs[against], prompt_ids, head), "against": against})
    with torch.inference_mode():
        top = head(head.decoder(input_ids=torch.tensor(prompt_ids[:8])).last_hidden_state).max(-1).values
    step_at_max = bf16_step(float(top.float().median()))
    text = "\n\n".join(
        [
            f"Command: `python {' '.join(sys.argv)}`",
            f"Target: random LLaVA at LLaVA-1.5's width, {args.layers} layer(s), bf16, CPU "
            f"({torch.get_num_threads()} threads); {args.rows} text-only prompts of {args.prompt_length} random "
            f"tokens, {args.new_tokens} new tokens each; head confidence {args.confidence}.",
            margin_table(margins, step_at_max),
            rate_table(rows, speeds),
        ]
    )
    print("\n" + text + "\n", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# Losslessness in bf16\n\n{text}\n")


if __name__ == "__main__":
    main()
