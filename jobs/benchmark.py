"""Benchmark: every decoding mode side by side on the same models and images, as ratios.

    python -m jobs.benchmark                               # the demo family on the bundled demo shards
    python -m jobs.benchmark --quick                       # two drafts, one replay rate, 4 images, batch 1
    python -m jobs.benchmark --target DIR --text-draft DIR --vlm-draft DIR --shards 's3://b/x/*.tar'
    python -m jobs.benchmark --out results/benchmark       # refresh the committed results on purpose

Prints the table and writes it (Markdown and JSON) to --out (default out/benchmark). See
specvlm/evaluation/benchmark.py for what each row measures and which figures it flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
from dataclasses import asdict
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from specvlm.demo import ASSETS
from specvlm.engine import DraftSettings, build_draft
from specvlm.evaluation.benchmark import caption_requests, markdown_table, run_suite
from specvlm.models.loading import load_target
from specvlm.specdec.decode import generation_eos


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=str(ASSETS / "models/target"))
    parser.add_argument("--text-draft", default=str(ASSETS / "models/draft-text"))
    parser.add_argument("--vlm-draft", default=str(ASSETS / "models/draft-vlm"))
    parser.add_argument("--shards", default=str(ASSETS / "shards/*.tar"))
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="out/benchmark", help="path of the .md and .json results, no suffix")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer modes and images, for a first look: a few minutes on a quiet 2-core CPU, several times that on "
        "a busy one",
    )
    args = parser.parse_args(argv)
    if args.quick:
        # A first look: batch 1 only, 4 images, two timed rounds (a spread needs two). With 8 images and both HF
        # assisted modes it took 6 CPU-minutes (27 min of wall time on 2 cores at load 20-30); the target alone
        # decoding the images is its largest part, so fewer images is what shortens it.
        args.requests, args.batches, args.repeats = min(args.requests, 4), [1], min(args.repeats, 2)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    target = load_target(args.target, device=args.device, dtype="float32" if args.device == "cpu" else "auto")
    requests = caption_requests(target, args.shards, args.requests)
    text = DraftSettings("text", args.text_draft)
    vlm = DraftSettings("vlm", args.vlm_draft)
    tree = dict(mode="tree", gamma=8)  # the tree defaults, tuned on the demo family: narrow and deep

    def draft(settings: DraftSettings, lean: bool = True, **changes):
        return lambda: build_draft(dataclasses.replace(settings, **changes), target, lean=lean)

    drafts = {
        "text chain γ=3": draft(text, gamma=3),
        "text chain γ=5": draft(text, gamma=5),
        "vlm chain γ=3": draft(vlm, gamma=3),
        "vlm chain γ=5": draft(vlm, gamma=5),
        "vlm chain γ=7": draft(vlm, gamma=7),
        "vlm chain γ=5, HF draft forward": draft(vlm, lean=False, gamma=5),
        "vlm tree depth 8": draft(vlm, **tree),
        "text tree depth 8": draft(text, **tree),
        "prompt lookup γ=5": draft(DraftSettings("prompt_lookup"), gamma=5),
    }
    if args.quick:
        drafts = {name: drafts[name] for name in ("vlm chain γ=5", "text chain γ=3")}
    assistants = {"text draft": drafts["text chain γ=3"]().model, "vlm draft": drafts["vlm chain γ=5"]().model}
    if args.quick:
        del assistants["text draft"]  # one HF assisted mode is enough for a first look
    eos = generation_eos(target.model)
    rows = run_suite(
        target.model,
        drafts,
        assistants,
        requests,
        max_new_tokens=args.max_new_tokens,
        eos=eos,
        pad_id=target.tokenizer.pad_token_id,
        batches=tuple(args.batches),
        repeats=args.repeats,
        replay_acceptance=(0.9,) if args.quick else (0.5, 0.7, 0.9),
        log=lambda line: print(line, flush=True),  # each line as it comes, also through a pipe (| tee)
    )

    device = (
        torch.cuda.get_device_name()
        if target.model.device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    header = (
        f"Device: {device}. Target {args.target}; {len(requests)} demo images, caption task, greedy, "
        f"max {args.max_new_tokens} new tokens; median of {args.repeats} timed rounds after a warm-up, modes "
        "taking turns; spread = slowest / fastest round.\n\n"
    )
    table = markdown_table(rows)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(header + table + "\n")
    out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    flagged = [r for r in rows if r.flags]
    if flagged:
        print(f"{len(flagged)} rows flagged (see the flags column): rerun on a quieter machine or with more --repeats")
    print(f"written: {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
