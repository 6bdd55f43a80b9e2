"""Throughput under load, engine level: speculation against the best plain batch size, and continuous batching.

    python -m jobs.throughput                                  # demo family, 512 held-out scenes
    python -m jobs.throughput --requests 128 --caps 1 8 64     # quicker
    python -m jobs.throughput --out results/throughput.md      # refresh the committed results on purpose

Writes a Markdown report (default out/throughput.md). See specvlm/evaluation/throughput.py for what is measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from specvlm.evaluation.demo_family import DEMO_MODELS, load_demo_family
from specvlm.evaluation.throughput import cap_sweep, cap_table, continuous_vs_static


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=DEMO_MODELS)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--caps", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per setting (the best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-caps", action="store_true", help="only continuous vs static batching")
    parser.add_argument("--out", type=Path, default=Path("out/throughput.md"))
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after each section: a long run that dies keeps what it measured
        args.out.write_text("\n".join(lines) + "\n")

    family = load_demo_family(args.models, args.threads)
    target, eos, draft = family.target, family.eos, family.vlm_draft

    lines = [
        f"# Throughput under load\n\nCPU ({platform.machine()}, {torch.get_num_threads()} torch threads); demo "
        f"family, greedy; held-out world scenes; max {args.max_new_tokens} new tokens. Every setting ran "
        f"{args.rounds} times, settings taking turns; the best round counts. Command: "
        f"`python -m jobs.throughput {' '.join(argv if argv is not None else sys.argv[1:])}`.\n"
    ]
    if not args.skip_caps:
        requests = family.requests(args.requests)
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
    mixed = family.requests(max(args.requests // 2, 64), tasks=("vqa", "caption"))
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
