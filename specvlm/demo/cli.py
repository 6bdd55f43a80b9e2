"""Command line of `python -m jobs.make_demo`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from specvlm.demo.make import DemoPlan, make_demo
from specvlm.models.loading import DTYPES, ModelLoadError
from specvlm.training.cli import DefaultsFormatter, add_common_arguments, apply_common_arguments
from specvlm.training.draft import DraftShape
from specvlm.training.loop import TrainConfig
from specvlm.training.outputs import OutputsError


def make_demo_main(argv: list[str] | None = None) -> int:
    plan = DemoPlan()
    parser = argparse.ArgumentParser(
        prog="python -m jobs.make_demo",
        description="Rebuild the demo model family from scratch: tokenizer, target, target outputs, text draft, "
        "VLM draft. Each stage resumes from its work directory. Defaults are the shipped models.",
        formatter_class=DefaultsFormatter,
    )
    parser.add_argument("--out", type=Path, default=plan.out_dir, help="where the three checkpoints go")
    parser.add_argument(
        "--work-dir", type=Path, default=plan.work_dir, help="checkpoints, shards, target outputs and loss logs"
    )
    parser.add_argument("--vocab-size", type=int, default=plan.vocab_size)
    parser.add_argument("--tokenizer-scenes", type=int, default=plan.tokenizer_scenes)
    parser.add_argument(
        "--vision-steps",
        type=int,
        default=plan.vision.steps,
        help="stage 0 of the target: its vision tower on cell labels",
    )
    parser.add_argument("--target-steps", type=int, default=plan.target.steps)
    parser.add_argument("--target-lr", type=float, default=plan.target.lr)
    parser.add_argument(
        "--finetune-steps",
        type=int,
        default=plan.target_finetune.steps,
        help="then the whole target, vision tower included, with more questions per scene",
    )
    parser.add_argument("--scenes-per-step", type=int, default=plan.scenes_per_step)
    for name in ("hidden", "layers", "heads", "intermediate", "vision_hidden"):
        parser.add_argument(f"--target-{name.replace('_', '-')}", type=int, default=getattr(plan.target_shape, name))
    parser.add_argument("--distill-scenes", type=int, default=plan.distill_scenes)
    parser.add_argument("--shard-size", type=int, default=plan.shard_size)
    parser.add_argument("--pretrain-scenes", type=int, default=plan.pretrain_scenes)
    parser.add_argument("--text-pretrain-steps", type=int, default=plan.text_pretrain.steps)
    parser.add_argument("--text-distill-steps", type=int, default=plan.text_distill.steps)
    parser.add_argument("--vlm-steps", type=int, default=plan.vlm_distill.steps)
    parser.add_argument("--draft-hidden", type=int, default=plan.draft_shape.hidden)
    parser.add_argument("--draft-layers", type=int, default=plan.draft_shape.layers)
    parser.add_argument("--draft-heads", type=int, default=plan.draft_shape.heads)
    parser.add_argument("--draft-batch-size", type=int, default=plan.draft_batch_size)
    parser.add_argument("--max-new-tokens", type=int, default=plan.max_new_tokens)
    parser.add_argument(
        "--eval-scenes",
        type=int,
        default=plan.eval_scenes,
        help="held-out scenes for a quality table at the end (default: skip)",
    )
    add_common_arguments(parser)
    parser.set_defaults(checkpoint_every=250)
    args = parser.parse_args(argv)
    apply_common_arguments(args)

    def steps(config: TrainConfig, count: int, **changes) -> TrainConfig:
        return dataclasses.replace(
            config,
            steps=count,
            checkpoint_every=args.checkpoint_every,
            device=args.device,
            warmup=min(config.warmup, max(1, count // 10)),
            **changes,
        )

    plan = dataclasses.replace(
        plan,
        out_dir=args.out,
        work_dir=args.work_dir,
        seed=args.seed,
        vocab_size=args.vocab_size,
        tokenizer_scenes=args.tokenizer_scenes,
        target_shape=dataclasses.replace(
            plan.target_shape,
            hidden=args.target_hidden,
            layers=args.target_layers,
            heads=args.target_heads,
            kv_heads=args.target_heads,
            intermediate=args.target_intermediate,
            vision_hidden=args.target_vision_hidden,
        ),
        vision=steps(plan.vision, args.vision_steps),
        target=steps(plan.target, args.target_steps, lr=args.target_lr),
        target_finetune=steps(plan.target_finetune, args.finetune_steps),
        scenes_per_step=args.scenes_per_step,
        distill_scenes=args.distill_scenes,
        shard_size=args.shard_size,
        pretrain_scenes=args.pretrain_scenes,
        draft_shape=DraftShape(args.draft_hidden, args.draft_layers, args.draft_heads),
        text_pretrain=steps(plan.text_pretrain, args.text_pretrain_steps),
        text_distill=steps(plan.text_distill, args.text_distill_steps),
        vlm_distill=steps(plan.vlm_distill, args.vlm_steps),
        draft_batch_size=args.draft_batch_size,
        max_new_tokens=args.max_new_tokens,
        dtype=DTYPES[args.dtype],
        eval_scenes=args.eval_scenes,
    )
    try:
        make_demo(plan)
    except (ModelLoadError, OutputsError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
