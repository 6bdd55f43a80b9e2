"""Throughput under load, engine level: speculation against the best plain batch size, and continuous batching.

    python -m jobs.throughput                                  # demo family, 512 held-out scenes
    python -m jobs.throughput --requests 128 --caps 1 8 64     # quicker
    python -m jobs.throughput --out results/throughput.md      # refresh the committed results on purpose

Writes a Markdown report (default out/throughput.md). See specvlm/evaluation/throughput.py for what is measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from specvlm.demo import ASSETS
from specvlm.engine import DraftSettings, build_draft
from specvlm.evaluation.throughput import cap_sweep, cap_table, continuous_vs_static, world_requests
from specvlm.models.loading import load_target
from specvlm.specdec.decode import generation_eos


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=ASSETS / "models")
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--caps", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per setting (the best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-caps", action="store_true", help="only continuous vs static batching")
    parser.add_argument("--out", type=Path, default=Path("out/throughput.md"))
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after each section: a long run that dies keeps what it measured
        args.out.write_text("\n".join(lines) + "\n")

    target = load_target(str(args.models / "target"), device="cpu", dtype="float32")
    eos = generation_eos(target.model)
    vlm = DraftSettings("vlm", str(args.models / "draft-vlm"))

    def draft(**changes):
        return lambda: build_draft(dataclasses.replace(vlm, **changes), target)

    lines = [
        f"# Throughput under load\n\nCPU ({platform.machine()}, {torch.get_num_threads()} torch threads); demo "
        f"family, greedy; held-out world scenes; max {args.max_new_tokens} new tokens. Every setting ran "
        f"{args.rounds} times, settings taking turns; the best round counts. Command: "
        f"`python -m jobs.throughput {' '.join(argv if argv is not None else sys.argv[1:])}`.\n"
    ]
    if not args.skip_caps:
        requests = world_requests(target.processor, args.requests)
        drafts = {"speculative (default: VLM draft, gamma auto, adaptive)": draft(), "fixed chain γ=3": draft(gamma=3)}
        runs = cap_sweep(
            target.model,
            drafts,
            requests,
            tuple(args.caps),
            max_new_tokens=args.max_new_tokens,
            eos=eos,
            rounds=args.rounds,
        )
        lines += ["## Speculation against plain decoding, at each running-batch cap", "", cap_table(runs), ""]
        auto = {r.name: r.describe for r in runs if r.cap is None}
        lines += ["Operating points chosen with batch size auto:", "", "```", json.dumps(auto, indent=1), "```", ""]
        save()

    # Short answers mixed with captions: output lengths from a few tokens to dozens.
    mixed = world_requests(target.processor, max(args.requests // 2, 64), tasks=("vqa", "caption"))
    lines.append("## Continuous against static batching (short answers mixed with captions)\n")
    lines.append("| draft | cap | output lengths | static tok/s | continuous tok/s | continuous / static | identical |")
    lines.append("|---|---:|---|---:|---:|---:|---|")
    for name, make in (("none", lambda: None), ("VLM draft, adaptive", draft())):
        for cap in (8, 32):
            r = continuous_vs_static(
                target.model, make, mixed, cap, max_new_tokens=args.max_new_tokens, eos=eos, rounds=args.rounds
            )
            lengths = f"{r['output_lengths'][0]}-{r['output_lengths'][-1]}"
            lines.append(
                f"| {name} | {cap} | {lengths} | {r['static_tokens_per_s']:.0f} | "
                f"{r['continuous_tokens_per_s']:.0f} | {r['speedup']:.2f}x | {r['identical']} |"
            )
            print(lines[-1], flush=True)
            save()
    print("\n".join(lines))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
