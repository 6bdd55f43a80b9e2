"""Compiled against eager decode steps (`compute.compile`), engine level, plain and speculative, at several caps.

    python -m jobs.compile_benchmark                               # demo family, 256 held-out scenes, caps 8 64 256
    python -m jobs.compile_benchmark --requests 64 --caps 8 64     # quicker
    python -m jobs.compile_benchmark --out results/compile.md      # refresh the committed results on purpose

Each setting runs `--rounds` times, settings taking turns, and the best round counts; compiled forwards are
kept on the model, so the first round pays the compile (reported apart as warm-up) and later rounds run warm.
Outputs are compared token by token: compiled decoding must give exactly what eager decoding gives.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from specvlm.demo import ASSETS
from specvlm.engine import DraftSettings, build_draft
from specvlm.evaluation.throughput import decode, take_turns, world_requests
from specvlm.models.loading import load_target
from specvlm.specdec.decode import generation_eos


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=ASSETS / "models")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--caps", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per setting (the best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("out/compile.md"))
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    target = load_target(str(args.models / "target"), device="cpu", dtype="float32")
    eos = generation_eos(target.model)
    requests = world_requests(target.processor, args.requests)
    settings = DraftSettings("vlm", str(args.models / "draft-vlm"))
    drafts = {"plain": None, "speculative": lambda: build_draft(dataclasses.replace(settings), target)}
    command = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Compiled against eager decode steps\n",
        f"CPU ({platform.machine()}, {torch.get_num_threads()} torch threads); demo family, greedy; "
        f"{args.requests} held-out scenes; max {args.max_new_tokens} new tokens; speculative = VLM draft, gamma "
        f"auto, adaptive. Best of {args.rounds} rounds, settings taking turns. Command: "
        f"`python -m jobs.compile_benchmark {command}`.\n",
        "| cap | decoding | eager tok/s | compiled tok/s | compiled / eager | identical | first round's extra s |",
        "|---:|---|---:|---:|---:|---|---:|",
    ]
    for cap in args.caps:
        for name, make in drafts.items():
            runs = {
                mode: lambda cap=cap, make=make, compiled=compiled: decode(
                    target.model,
                    make() if make else None,
                    requests,
                    cap,
                    max_new_tokens=args.max_new_tokens,
                    eos=eos,
                    compile=compiled,
                )
                for mode, compiled in (("eager", False), ("compiled", True))
            }
            out = take_turns(runs, args.rounds)
            eager, compiled = out["eager"], out["compiled"]
            tokens = sum(len(r.tokens) for r in eager[1])
            rate = {mode: tokens / min(seconds) for mode, (seconds, _, _) in out.items()}
            same = [r.tokens for r in eager[1]] == [r.tokens for r in compiled[1]]
            failure = compiled[2]["compile"]["fell_back_to_eager"]
            if failure:
                print(f"compiling failed, the compiled run decoded eagerly: {failure}")
            warm = compiled[0][0] - min(compiled[0])  # the first round compiles whatever graphs are new
            lines.append(
                f"| {cap} | {name} | {rate['eager']:.0f} | {rate['compiled']:.0f} | "
                f"{rate['compiled'] / rate['eager']:.2f}x | {'yes' if same else 'NO'} | {warm:.1f} |"
            )
            print(lines[-1], flush=True)
            args.out.write_text("\n".join(lines) + "\n")
    lines += [
        "",
        "The first round's extra seconds are its compile: the first setting compiles the graphs, the others "
        "mostly reuse them (shapes are dynamic on a CPU, so one graph serves every row count and length).",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
