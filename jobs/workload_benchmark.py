"""Long outputs and large images: speculation against the best plain batch size, memory per row, the cap chosen.

    python -m jobs.workload_benchmark --quick                        # a few minutes on a loaded CPU
    python -m jobs.workload_benchmark --workloads anyres --caps 1 4 8
    python -m jobs.workload_benchmark --out results/workloads.md     # refresh the committed results on purpose

Two workloads (specvlm/evaluation/workloads.py): `long`, the demo family captioning with 200-400 new tokens per
row (EOS ignored), and `anyres`, a tiny LLaVA-NeXT target with its truncated copy as draft, 1,400-2,600 image
tokens per row. Each runs plain decoding (no draft) and the default speculative engine (VLM draft, gamma auto,
the controller choosing each step's depth) at every cap and at batch size auto, the settings taking turns
(specvlm/evaluation/throughput.py), all within the job's default slot budget (compute.max_batch_tokens). Then the
best plain cap and the speculative engine at auto run once more each, to measure their peak memory.
Writes a Markdown report (default out/workloads.md).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import resource
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from pipeline.config import ComputeConfig
from specvlm.demo import ASSETS
from specvlm.engine import DraftSettings, build_draft
from specvlm.evaluation.throughput import Run, cap_sweep, cap_table, decode
from specvlm.evaluation.workloads import (
    LONG_OUTPUT,
    PeakMemory,
    anyres_requests,
    build_anyres_models,
    long_output_requests,
)
from specvlm.models.loading import load_target

SPECULATIVE = "speculative (default)"
ANYRES_NEW_TOKENS = 48
MIB = 1 << 20


def _long(models: Path, count: int, scratch: Path):
    target = load_target(str(models / "target"), device="cpu", dtype="float32")
    requests = long_output_requests(target.processor, count)
    return target, str(models / "draft-vlm"), requests, LONG_OUTPUT[1]


def _anyres(models: Path, count: int, scratch: Path):
    tokenizer = AutoTokenizer.from_pretrained(models / "target")
    target_folder, draft_folder = build_anyres_models(tokenizer, scratch)
    target = load_target(str(target_folder), device="cpu", dtype="float32")
    return target, str(draft_folder), anyres_requests(target.processor, count), ANYRES_NEW_TOKENS


WORKLOADS = {
    "long": ("Long outputs: demo captions forced to 200-400 new tokens", _long),
    "anyres": (f"LLaVA-NeXT anyres: 7-10 crops, 1,400-2,600 image tokens, {ANYRES_NEW_TOKENS} new tokens", _anyres),
}


def _memory_table(runs: list[Run]) -> list[str]:
    """Per setting: the rows the cache held, the slots (and bytes) of one row, the batch's KV, and the share of the
    engine's time spent admitting rows (prefill: the vision pass and the prompt, for the target and a VLM draft)."""
    lines = [
        "| setting | cap | rows run | slots per row | KV per row (KiB) | KV of the batch (MiB) | slot budget | "
        "time admitting |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        kv, rows, slots, seconds = (run.describe[k] for k in ("kv", "rows", "capacity", "seconds"))
        chosen = run.describe["auto_rows"]
        cap = f"auto ({chosen['rows']})" if chosen else run.cap
        lines.append(
            f"| {run.name} | {cap} | {rows} | {slots} | {kv['bytes_per_slot'] * slots / 1024:.0f} | "
            f"{kv['bytes_per_slot'] * slots * rows / MIB:.1f} | {kv['slot_budget']} | "
            f"{seconds['admission'] / sum(seconds.values()):.0%} |"
        )
    return lines


def _summary(label: str, runs: list[Run], count: int, peaks: dict[str, PeakMemory]) -> str:
    plain = max((r for r in runs if r.name == "plain" and r.cap is not None), key=lambda r: r.tokens_per_s)
    spec = next(r for r in runs if r.name == SPECULATIVE and r.cap is None)
    same = [x.tokens for x in spec.results] == [x.tokens for x in plain.results]
    images = {r.name: count / min(r.seconds) for r in (plain, spec)}
    slots = spec.describe["capacity"]
    return (
        f"| {label} | {plain.cap} | {plain.tokens_per_s:.0f} | {images['plain']:.2f} | "
        f"{spec.describe['auto_rows']['rows']} | {spec.tokens_per_s:.0f} | {images[SPECULATIVE]:.2f} | "
        f"{spec.tokens_per_s / plain.tokens_per_s:.2f}x | {images[SPECULATIVE] / images['plain']:.2f}x | "
        f"{spec.describe['kv']['bytes_per_slot'] * slots / 1024:.0f} | {peaks['plain'].added / MIB:.0f} | "
        f"{peaks[SPECULATIVE].added / MIB:.0f} | {'yes' if same else 'NO'} |"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=ASSETS / "models", help="the demo family")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--requests", type=int, default=96, help="requests per workload")
    parser.add_argument("--caps", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per setting (the best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="24 requests, caps 8 and 64, one round")
    parser.add_argument("--out", type=Path, default=Path("out/workloads.md"))
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.caps, args.rounds = 24, [8, 64], 1
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    budget = ComputeConfig().max_batch_tokens
    command = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Long outputs and large images\n",
        f"CPU ({platform.machine()}, {torch.get_num_threads()} torch threads, load average "
        f"{os.getloadavg()[0]:.1f} at the start); greedy, EOS ignored (every output runs to its length); "
        f"{args.requests} requests per workload; compute.max_batch_tokens at its default {budget}. Every setting "
        f"ran {args.rounds} times, settings taking turns; the best round counts. Peak memory: one more run of each "
        f"headline setting, the resident set it added over what was in use before it. Command: "
        f"`python -m jobs.workload_benchmark {command}`.\n",
        "| workload | best plain cap | plain tok/s | plain images/s | speculative cap chosen (auto) | speculative "
        "tok/s | speculative images/s | tok/s vs best plain | images/s vs best plain | KV per row (KiB) | peak "
        "memory added, plain (MiB) | peak memory added, speculative (MiB) | identical |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    sections = []

    def save() -> None:  # after each workload: a long run that dies keeps what it measured
        args.out.write_text("\n".join(lines + sections) + "\n")

    with tempfile.TemporaryDirectory() as scratch:
        for key in args.workloads:
            label, load = WORKLOADS[key]
            target, draft_path, requests, max_new_tokens = load(args.models, args.requests, Path(scratch) / key)

            draft = functools.partial(build_draft, DraftSettings("vlm", draft_path), target)
            common = dict(max_new_tokens=max_new_tokens, eos=(), max_batch_tokens=budget)
            runs = cap_sweep(
                target.model, {SPECULATIVE: draft}, requests, tuple(args.caps), rounds=args.rounds, **common
            )
            best = max((r for r in runs if r.name == "plain" and r.cap is not None), key=lambda r: r.tokens_per_s)
            peaks = {"plain": PeakMemory(), SPECULATIVE: PeakMemory()}
            with peaks["plain"]:
                decode(target.model, None, requests, best.cap, **common)
            with peaks[SPECULATIVE]:
                decode(target.model, draft(), requests, None, **common)
            lines.append(_summary(label, runs, len(requests), peaks))
            prompts = sorted(len(r.input_ids) for r in requests)
            sections += [
                f"\n## {label}\n",
                f"Prompt tokens per row {prompts[0]}-{prompts[-1]}.\n",
                cap_table(runs),
                "",
                *_memory_table(runs),
            ]
            print(lines[-1], flush=True)
            save()
    sections.append(
        f"\nPeak resident set of the whole process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB."
    )
    save()
    print("\n".join(lines + sections))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
