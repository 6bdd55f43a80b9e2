"""Compiled against eager decode steps (`compute.compile`), engine level, plain and speculative, at several caps.

    python -m jobs.compile_benchmark                               # demo family, 256 held-out scenes, caps 8 64 256
    python -m jobs.compile_benchmark --requests 64 --caps 8 64     # quicker
    python -m jobs.compile_benchmark --out results/compile.md      # refresh the committed results on purpose

Each setting runs `--rounds` times, settings taking turns, and the best round counts; compiled forwards are
kept on the model, so the first round pays the compile (reported apart as warm-up) and later rounds run warm.
Outputs are compared token by token: compiled decoding must give exactly what eager decoding gives. A second table
times admission's prompt pass alone (the target's prefill over image embeddings), compiled against eager, at a few
row counts and prompt lengths: the fastest of `--prompt-calls` calls each.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from specvlm.evaluation.compile_comparison import TABLE_HEADER, compare
from specvlm.evaluation.demo_family import DEMO_MODELS, load_demo_family
from specvlm.specdec.compiled import StepCompiler
from specvlm.specdec.runner import ModelRunner


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=DEMO_MODELS)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--caps", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per setting (the best is kept)")
    parser.add_argument("--prompt-calls", type=int, default=12, help="timed calls per prompt shape (fastest counts)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("out/compile.md"))
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    family = load_demo_family(args.models, args.threads)
    target, eos = family.target, family.eos
    requests = family.requests(args.requests)
    drafts = {"plain": None, "speculative": family.vlm_draft()}
    command = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Compiled against eager decode steps\n",
        f"CPU ({platform.machine()}, {torch.get_num_threads()} torch threads); demo family, greedy; "
        f"{args.requests} held-out scenes; max {args.max_new_tokens} new tokens; speculative = VLM draft, gamma "
        f"auto, adaptive. Best of {args.rounds} rounds, settings taking turns. Command: "
        f"`python -m jobs.compile_benchmark {command}`.\n",
        *TABLE_HEADER,
    ]
    settings = dict(max_new_tokens=args.max_new_tokens, eos=eos, rounds=args.rounds)
    for row in compare(target.model, drafts, requests, tuple(args.caps), **settings):
        if row.fell_back:
            print(f"compiling failed, the compiled run decoded eagerly: {row.fell_back}")
        lines.append(row.table_row())
        print(lines[-1], flush=True)
        args.out.write_text("\n".join(lines) + "\n")
    lines += [
        "",
        "The first round's extra seconds are its compile: the first setting compiles the graphs, the others "
        "mostly reuse them (shapes are dynamic on a CPU, so one graph serves every row count and length).",
        "",
        "| prompt pass (rows x tokens) | eager ms | compiled ms | compiled / eager |",
        "|---|---:|---:|---:|",
        *prompt_rows(target.model, args.prompt_calls),
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


def prompt_rows(model: torch.nn.Module, calls: int) -> list[str]:
    """The target's prompt pass over embeddings, as admission runs it (a scratch runner laid out like the batch's),
    eager against compiled: one table row per shape."""
    compiler = StepCompiler(model.device)
    lines = []
    for rows, length in ((2, 20), (4, 20), (8, 40)):
        tokens = torch.zeros(rows, length, dtype=torch.long, device=model.device)
        best = {}
        with torch.inference_mode():
            embeds = model.get_input_embeddings()(tokens)
            for mode, chosen in (("eager", None), ("compiled", compiler)):
                batch = ModelRunner(model, rows, 2 * length, compiler=chosen)
                batch.prefill(tokens[:, :4], [4] * rows)  # allocates the batch's cache, which scratch copies
                seconds = []
                for _ in range(calls + 2):  # the first two calls compile and warm
                    scratch = batch.scratch(rows, 2 * length)
                    start = time.perf_counter()
                    scratch.prefill(tokens, [length] * rows, inputs_embeds=embeds)
                    seconds.append(time.perf_counter() - start)
                best[mode] = min(seconds[2:])
        lines.append(
            f"| {rows} x {length} | {best['eager'] * 1e3:.2f} | {best['compiled'] * 1e3:.2f} | "
            f"{best['eager'] / best['compiled']:.2f}x |"
        )
        print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main()
