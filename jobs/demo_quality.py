"""Quality of the demo family on held-out scenes (seed 1), greedy, through the engine.

Prints the target's exact-match accuracy per task, then for each draft x gamma x task the block efficiency tau
(pooled: all new tokens / all target passes), the acceptance rate, and the per-token acceptance of content
words (colours, shapes, sizes, counts, positions, backgrounds) against the other tokens.

    python -m jobs.demo_quality                   # the shipped models, 100 scenes
    python -m jobs.demo_quality --scenes 20 --models out/make_demo-models

The report is also written to out/demo-quality.md (--out; `--out results/demo-quality.md` refreshes the committed
report on purpose).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from specvlm.demo.quality import evaluate
from specvlm.engine import DraftSettings, build_draft
from specvlm.models.loading import decode_parameters, load_target


def describe(name: str, model: torch.nn.Module, path: Path) -> str:
    params = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e6
    return (
        f"{name:<11} {params / 1e6:>6.2f}M params ({decode_parameters(model) / 1e6:.2f}M per decoded token), "
        f"{size:.1f} MB on disk"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("assets/demo/models"))
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1, help="world seed of the held-out scenes")
    parser.add_argument("--gammas", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("out/demo-quality.md"))
    args = parser.parse_args()
    hf_logging.disable_progress_bar()

    target = load_target(str(args.models / "target"), device="cpu", dtype="float32")
    drafts = {kind: DraftSettings(kind, str(args.models / f"draft-{kind}")) for kind in ("text", "vlm")}
    lines = [describe("target", target.model, args.models / "target")]
    for kind, settings in drafts.items():
        draft = build_draft(settings, target)
        lines.append(
            describe(f"draft-{kind}", draft.model, args.models / f"draft-{kind}") + f", c = {draft.cost_ratio:.3f}"
        )
    start = time.perf_counter()
    report = evaluate(
        target, drafts, seed=args.seed, scenes=args.scenes, gammas=tuple(args.gammas), batch_size=args.batch_size
    )
    text = "\n".join(lines) + "\n\n" + report.table()
    print(text)
    print(f"\n({time.perf_counter() - start:.0f} s, {torch.get_num_threads()} threads)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = f"python -m jobs.demo_quality --scenes {args.scenes} --seed {args.seed}"
    args.out.write_text(f"Demo family quality, greedy, through the engine (`{command}`):\n\n```\n{text}\n```\n")


if __name__ == "__main__":
    main()
