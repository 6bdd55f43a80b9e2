"""Chains against trees of several shapes on the demo family: how the tree defaults were chosen.

Every strategy decodes the same demo images (caption, greedy) with one draft; the table gives tau, the
tokens/s relative to the engine's autoregressive mode (best of `--repeats` runs) and token identity.

    python -m jobs.tree_sweep                                            # -> out/tree-sweep.md
    python -m jobs.tree_sweep --out results/tree-sweep.md                # refresh the committed table on purpose
    python -m jobs.tree_sweep --draft text --out results/tree-sweep-text.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from specvlm.demo import ASSETS
from specvlm.demo.quality import decode_all
from specvlm.engine import DraftSettings, build_draft
from specvlm.evaluation.benchmark import caption_requests
from specvlm.models.loading import load_target
from specvlm.specdec.tree import TreeSettings

CHAINS = (3, 5, 7, 9, 11)
TREES = (  # depth, topk, beam, max_nodes
    (4, 2, 2, 8),
    (5, 2, 2, 10),
    (6, 3, 3, 16),
    (8, 2, 1, 10),
    (8, 2, 2, 16),
    (8, 4, 4, 24),
    (12, 2, 1, 14),
)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", choices=["vlm", "text"], default="vlm")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("out/tree-sweep.md"))
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)

    target = load_target(str(ASSETS / "models/target"), device="cpu", dtype="float32")
    requests = caption_requests(target, str(ASSETS / "shards/*.tar"), args.requests)
    eos = target.tokenizer.eos_token_id
    path = str(ASSETS / f"models/draft-{args.draft}")
    strategies = {"autoregressive": DraftSettings()}
    for gamma in CHAINS:
        strategies[f"chain γ={gamma}"] = DraftSettings(args.draft, path, gamma=gamma)
    for depth, topk, beam, nodes in TREES:
        tree = TreeSettings(topk=topk, beam=beam, max_nodes=nodes)
        name = f"tree depth {depth}, top-{topk}, beam {beam}, {nodes} nodes"
        strategies[name] = DraftSettings(args.draft, path, mode="tree", gamma=depth, tree=tree)

    lines = ["| batch | strategy | tau | tok/s vs autoregressive | identical |", "|---:|---|---:|---:|---:|"]
    for batch in args.batches:
        best, outputs = {}, {}
        for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits every strategy alike
            for name, settings in strategies.items():
                draft = build_draft(settings, target)
                start = time.perf_counter()
                out = decode_all(target.model, draft, requests, max_new_tokens=64, eos_token_id=eos, batch_size=batch)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
                outputs[name] = out
        reference = [r.tokens for r in outputs["autoregressive"]]
        for name, out in outputs.items():
            tau = sum(len(r.tokens) for r in out) / sum(r.metrics.target_calls for r in out)
            same = sum(r.tokens == ref for r, ref in zip(out, reference)) / len(reference)
            lines.append(f"| {batch} | {name} | {tau:.2f} | {best['autoregressive'] / best[name]:.2f} | {same:.0%} |")
            print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        f"Chains and trees, {args.draft} draft, {len(requests)} demo images, caption, greedy, CPU with "
        f"{args.threads} torch thread(s) (`python -m jobs.tree_sweep --draft {args.draft}`):\n\n"
        + "\n".join(lines)
        + "\n"
    )


if __name__ == "__main__":
    main()
