"""Benchmark: every decoding mode side by side on the same models and images, as ratios.

    python -m jobs.benchmark                               # the demo family on the bundled demo shards
    python -m jobs.benchmark --requests 16 --repeats 1     # quicker
    python -m jobs.benchmark --target DIR --text-draft DIR --vlm-draft DIR --shards 's3://b/x/*.tar'

Prints the table and writes it (Markdown and JSON) under results/. See specvlm/evaluation/benchmark.py for what each
row measures.
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import asdict
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from specvlm.demo import ASSETS
from specvlm.evaluation.benchmark import caption_requests, markdown_table, run_suite
from specvlm.models.loading import load_draft, load_target
from specvlm.specdec.tree import TreeSettings


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
    parser.add_argument("--out", default="results/benchmark")
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    target = load_target(args.target, device=args.device, dtype="float32" if args.device == "cpu" else "auto")
    requests = caption_requests(target, args.shards, args.requests)
    text = lambda **kw: load_draft("text", target, args.text_draft, **kw)
    vlm = lambda **kw: load_draft("vlm", target, args.vlm_draft, **kw)
    tree = TreeSettings()  # the defaults, tuned on the demo family: narrow and deep
    drafts = {
        "text chain γ=3": (text, 3),
        "text chain γ=5": (text, 5),
        "vlm chain γ=3": (vlm, 3),
        "vlm chain γ=5": (vlm, 5),
        "vlm chain γ=7": (vlm, 7),
        "vlm chain γ=5, HF draft forward": (lambda: vlm(lean=False), 5),
        "vlm tree depth 8": (lambda: vlm(tree=tree), 8),
        "text tree depth 8": (lambda: text(tree=tree), 8),
        "prompt lookup γ=5": (lambda: load_draft("prompt_lookup", target), 5),
    }
    assistants = {"text draft": text().model, "vlm draft": vlm().model}
    eos = target.model.generation_config.eos_token_id
    eos = tuple(eos) if isinstance(eos, list) else (eos,)
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
    )

    device = (
        torch.cuda.get_device_name()
        if target.model.device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    header = (
        f"Device: {device}. Target {args.target}; {len(requests)} demo images, caption task, greedy, "
        f"max {args.max_new_tokens} new tokens; median of {args.repeats} timed runs after a warm-up.\n\n"
    )
    table = markdown_table(rows)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(header + table + "\n")
    out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    print(f"written: {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
