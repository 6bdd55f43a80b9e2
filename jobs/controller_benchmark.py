"""The depth controller against the depths a user could fix by hand, trial after trial.

    python -m jobs.controller_benchmark                      # 12 trials per setting, demo target
    python -m jobs.controller_benchmark --quick              # 3 trials, fewer fixed depths: a smoke run
    python -m jobs.controller_benchmark --out results/controller-benchmark.md   # refresh the committed table

Each setting is a draft (a copy of the target, which every step accepts in full; a random tiny Llama, which
accepts next to nothing) at a running-batch cap (1 and 8 rows). A trial runs, taking turns on the same requests:
plain decoding (no draft), the draft at every fixed depth (adaptive off), and the adaptive engine, which starts
with no costs learned, so that each trial is one more chance for a noisy first measurement to mislead it. The
adaptive run is compared with the better of plain decoding and the best fixed depth, each taken as its median
over the trials (a median, not the best round, so that no baseline is flattered by the luckiest of many runs), and
with the better of the two in its own trial (the best fixed depth still chosen by the medians), which a machine
whose load changes from trial to trial disturbs far less.

Writes a Markdown report (default out/controller-benchmark.md).
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specvlm.engine import AUTO_DEPTH
from specvlm.evaluation.demo_family import DEMO_MODELS, load_demo_family, world_requests
from specvlm.evaluation.throughput import decode, take_turns
from specvlm.models.loading import LoadedTarget, decode_parameters, load_draft_model
from specvlm.specdec.drafts import ModelDraft

WITHIN = 0.9  # the adaptive engine must reach this share of the better of plain and the best fixed depth


def random_draft_model(target: LoadedTarget, seed: int = 0) -> torch.nn.Module:
    """A tiny random-weight Llama over the target's vocabulary: a draft that is almost never right."""
    text = target.model.config.text_config
    tokenizer = target.tokenizer
    config = LlamaConfig(
        vocab_size=text.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=text.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def make_draft(model: torch.nn.Module, target: LoadedTarget, *, text_only: bool, gamma: int) -> ModelDraft:
    return ModelDraft(
        model,
        text_only=text_only,
        image_token_id=target.image_token_id,
        target_vocab=target.output_vocab,
        cost_ratio=decode_parameters(model) / decode_parameters(target.model),
        name=type(model).__name__,
        gamma=gamma,
    )


def trial_runs(target: LoadedTarget, draft, requests, cap: int, gammas: list[int], args, eos) -> dict:
    """name -> a run of all requests through a fresh engine: plain, each fixed depth, adaptive at full depth."""

    def run(make, adaptive=True):
        def timed():
            start = time.process_time()
            results, describe = decode(
                target.model, make(), requests, cap, max_new_tokens=args.max_new_tokens, eos=eos, adaptive=adaptive
            )
            return results, describe | {"cpu_seconds": time.process_time() - start}

        return timed

    runs = {"plain": run(lambda: None)}
    for gamma in gammas:
        runs[f"fixed γ={gamma}"] = run(lambda gamma=gamma: draft(gamma), adaptive=False)
    runs["adaptive"] = run(lambda: draft(max(gammas)))
    return runs


def histogram(depths: collections.Counter) -> str:
    total = sum(depths.values())
    return " ".join(f"{d}:{100 * n / total:.0f}%" for d, n in sorted(depths.items()))


def measure(
    name: str, target, draft, requests, cap: int, gammas: list[int], args, eos, log
) -> tuple[str, list[float], list[float]]:
    """One table row: the adaptive trials against the medians of plain and of each fixed depth, and against the
    better of plain and that best fixed depth in their own trial. Returns the row and both lists of ratios."""
    rates = collections.defaultdict(list)  # run name -> tokens/s per trial
    trials = []  # per adaptive trial: (tokens/s, depth histogram)
    reference = None
    for trial in range(args.trials):
        out = take_turns(trial_runs(target, draft, requests, cap, gammas, args, eos), rounds=1)
        for run_name, (seconds, results, describe) in out.items():
            tokens = [r.tokens for r in results]
            reference = reference or tokens
            if tokens != reference:
                raise RuntimeError(f"{name}, {run_name}: output differs from plain decoding")
            rate = sum(len(t) for t in tokens) / (describe["cpu_seconds"] if args.clock == "cpu" else seconds[0])
            rates[run_name].append(rate)
            if run_name == "adaptive":
                trials.append((rate, collections.Counter(describe["controller"]["depth_chosen_steps"])))
        rate, depths = trials[-1]
        log(f"{name}, cap {cap}, trial {trial + 1}: adaptive {rate:.0f} tok/s, {histogram(depths)}")
    median = {run_name: statistics.median(r) for run_name, r in rates.items()}
    best_fixed = max((n for n in median if n.startswith("fixed")), key=median.__getitem__)
    better = max(median["plain"], median[best_fixed])
    ratios = [rate / better for rate, _ in trials]
    # The same trial's baselines ran just before, so a machine whose load changes between trials (on a shared
    # one, by 2x) moves them with the adaptive run instead of making its trial look good or bad.
    paired = [rate / max(plain, fixed) for (rate, _), plain, fixed in zip(trials, rates["plain"], rates[best_fixed])]
    worst = min(range(len(trials)), key=ratios.__getitem__)
    every = sum((depths for _, depths in trials), collections.Counter())
    cells = [
        name,
        str(cap),
        f"{median['plain']:.0f}",
        f"{best_fixed.removeprefix('fixed ')}: {median[best_fixed] / median['plain']:.2f}x",
        f"{statistics.median(ratios):.2f}",
        f"{ratios[worst]:.2f}",
        f"{sum(r < WITHIN for r in ratios)}/{len(ratios)}",
        f"{statistics.median(paired):.2f}",
        f"{min(paired):.2f}",
        f"{sum(r < WITHIN for r in paired)}/{len(paired)}",
        histogram(every),
        histogram(trials[worst][1]),
    ]
    return "| " + " | ".join(cells) + " |", ratios, paired


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=DEMO_MODELS)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="3 trials, fixed depths 1, 2, 4 and 8")
    parser.add_argument("--caps", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests-per-row", type=int, default=4, help="requests per trial: this times the cap")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    # One thread by default: where other processes share the cores, threads that wait on each other make every
    # pass several times slower and its time a matter of luck (measured: 10x on two cores at load 5).
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's choice)")
    # On a machine other processes share, the wall clock charges each run for the time the others took the core,
    # which changes 2x from one run to the next; with one torch thread the process's CPU time is what the run
    # would take alone on its core.
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="what tokens/s are counted on")
    parser.add_argument("--out", type=Path, default=Path("out/controller-benchmark.md"))
    args = parser.parse_args(argv)
    if args.quick:
        args.trials = min(args.trials, 3)
    gammas = [1, 2, 4, AUTO_DEPTH] if args.quick else list(range(1, AUTO_DEPTH + 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    load_at_start = os.getloadavg()[0]  # how busy the machine was: on a shared one, it decides the noise

    family = load_demo_family(args.models, args.threads)
    target, eos = family.target, family.eos
    copy = load_draft_model("vlm", target, str(args.models / "target"))
    noise = random_draft_model(target)
    drafts = {
        "copy of the target": lambda gamma: make_draft(copy, target, text_only=False, gamma=gamma),
        "random tiny Llama": lambda gamma: make_draft(noise, target, text_only=True, gamma=gamma),
    }
    command = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# The depth controller against plain decoding and the best fixed depth\n",
        f"CPU ({platform.machine()}, {torch.get_num_threads()} torch threads); demo target, float32, greedy; "
        f"{args.trials} trials per setting, each running plain, fixed depths {', '.join(map(str, gammas))} "
        f"(adaptive off) and the adaptive engine (depth up to {max(gammas)}, no costs learned at the start) on "
        f"the same {args.requests_per_row} requests per row, taking turns; max {args.max_new_tokens} new tokens. "
        f"Tokens/s on the {args.clock} clock. Plain and fixed depths: the median tokens/s over the trials. "
        f"`vs better`: an adaptive trial's tokens/s "
        f"over the better of plain and the best fixed depth (their medians; `same trial`: that trial's own runs "
        f"of the two). Depths: share of the adaptive steps at each depth "
        f"(all trials; the worst trial). Command: `python -m jobs.controller_benchmark {command}`.\n",
        "| draft | cap | plain tok/s | best fixed vs plain | adaptive vs better: median | worst | "
        f"trials below {WITHIN} | same trial: median | worst | below {WITHIN} | depths, all trials | "
        "depths, worst trial |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    below = below_paired = 0
    for name, draft in drafts.items():
        for cap in args.caps:
            requests = world_requests(target.processor, args.requests_per_row * cap)
            row, ratios, paired = measure(name, target, draft, requests, cap, gammas, args, eos, log=print)
            below += sum(r < WITHIN for r in ratios)
            below_paired += sum(r < WITHIN for r in paired)
            lines.append(row)
            print(row, flush=True)
            args.out.write_text("\n".join(lines) + "\n")  # a long run that dies keeps what it measured
    lines.append(
        f"\nTrials more than {100 * (1 - WITHIN):.0f}% below the better baseline: {below} against the medians, "
        f"{below_paired} against their own trial's."
    )
    lines.append(f"Load average (1 min): {load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
