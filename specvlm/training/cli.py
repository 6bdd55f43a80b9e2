"""Command lines of `python -m jobs.train_draft` and `python -m jobs.make_demo`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import yaml

from specvlm.models.loading import DTYPES, ModelLoadError
from specvlm.training.draft import KINDS, DraftShape, train_draft
from specvlm.training.loop import TrainConfig
from specvlm.training.outputs import OutputsError


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda:0, ...")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; on a busy machine 1 can be faster)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the saved weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=200, metavar="STEPS")


def _setup(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def train_draft_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.train_draft",
        description="Train a draft for a target from the target's own outputs (the Parquet a caption, vqa or mc "
                    "job writes; images are read back from the input shards it names). Reruns resume from the "
                    "last checkpoint in the work directory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--target", required=True, help="the target checkpoint (directory, HF cache id or URI)")
    parser.add_argument("--kind", required=True, choices=KINDS,
                        help="text: a small LM fed the prompt's text; vlm: a small LM and projector on the "
                             "target's vision tower")
    parser.add_argument("--outputs", required=True, action="append", metavar="URI",
                        help="the target's outputs: a job's output directory, a Parquet file or a glob, any fsspec URI "
                             "(repeatable)")
    parser.add_argument("--out", required=True, type=Path, help="where to save the draft checkpoint")
    parser.add_argument("--work-dir", type=Path, help="checkpoints and loss logs (default: <out>-work)")
    parser.add_argument("--text", action="append", default=[], metavar="FILE",
                        help="plain text for stage 1 pretraining of a text draft, one example per line (repeatable)")
    parser.add_argument("--init", help="start from this draft (or, for --kind vlm, from a text draft's LM)")
    parser.add_argument("--hidden", type=int, default=DraftShape.hidden, help="hidden size of the draft's LM")
    parser.add_argument("--layers", type=int, default=DraftShape.layers, help="layers of the draft's LM")
    parser.add_argument("--heads", type=int, default=DraftShape.heads, help="attention heads of the draft's LM")
    parser.add_argument("--pretrain-steps", type=int, default=600, help="stage 1 steps (text drafts with --text)")
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=1000, help="distillation steps")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec option for reading outputs and shards, e.g. endpoint_url=http://... (repeatable)")
    _common(parser)
    args = parser.parse_args(argv)
    _setup(args)
    options = {}
    for item in args.storage_option:
        key, _, value = item.partition("=")
        options[key] = yaml.safe_load(value)

    def config(steps: int, lr: float) -> TrainConfig:
        return TrainConfig(steps=steps, lr=lr, warmup=args.warmup, checkpoint_every=args.checkpoint_every,
                           device=args.device)

    try:
        out = train_draft(
            target=args.target, kind=args.kind, outputs=args.outputs, out_dir=args.out, work_dir=args.work_dir,
            text_files=args.text, init=args.init, shape=DraftShape(args.hidden, args.layers, args.heads),
            pretrain=config(args.pretrain_steps, args.pretrain_lr), distill=config(args.steps, args.lr),
            batch_size=args.batch_size, seed=args.seed, storage_options=options, dtype=DTYPES[args.dtype],
        )
    except (ModelLoadError, OutputsError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"saved {args.kind} draft to {out}")
    return 0


def make_demo_main(argv: list[str] | None = None) -> int:
    from specvlm.training.demo import DemoPlan, make_demo

    plan = DemoPlan()
    parser = argparse.ArgumentParser(
        prog="python -m jobs.make_demo",
        description="Rebuild the demo model family from scratch: tokenizer, target, target outputs, text draft, "
                    "VLM draft. Each stage resumes from its work directory. Defaults are the shipped models.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=plan.out_dir, help="where the three checkpoints go")
    parser.add_argument("--work-dir", type=Path, default=plan.work_dir,
                        help="checkpoints, shards, target outputs and loss logs")
    parser.add_argument("--vocab-size", type=int, default=plan.vocab_size)
    parser.add_argument("--tokenizer-scenes", type=int, default=plan.tokenizer_scenes)
    parser.add_argument("--vision-steps", type=int, default=plan.vision.steps,
                        help="stage 0 of the target: its vision tower on cell labels")
    parser.add_argument("--target-steps", type=int, default=plan.target.steps)
    parser.add_argument("--target-lr", type=float, default=plan.target.lr)
    parser.add_argument("--finetune-steps", type=int, default=plan.target_finetune.steps,
                        help="then the whole target, vision tower included, with more questions per scene")
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
    parser.add_argument("--eval-scenes", type=int, default=plan.eval_scenes,
                        help="held-out scenes for a quality table at the end (default: skip)")
    _common(parser)
    parser.set_defaults(checkpoint_every=250)
    args = parser.parse_args(argv)
    _setup(args)

    def steps(config: TrainConfig, count: int, **changes) -> TrainConfig:
        return dataclasses.replace(config, steps=count, checkpoint_every=args.checkpoint_every, device=args.device,
                                   warmup=min(config.warmup, max(1, count // 10)), **changes)

    plan = dataclasses.replace(
        plan, out_dir=args.out, work_dir=args.work_dir, seed=args.seed, vocab_size=args.vocab_size,
        tokenizer_scenes=args.tokenizer_scenes,
        target_shape=dataclasses.replace(
            plan.target_shape, hidden=args.target_hidden, layers=args.target_layers, heads=args.target_heads,
            kv_heads=args.target_heads, intermediate=args.target_intermediate, vision_hidden=args.target_vision_hidden),
        vision=steps(plan.vision, args.vision_steps),
        target=steps(plan.target, args.target_steps, lr=args.target_lr),
        target_finetune=steps(plan.target_finetune, args.finetune_steps), scenes_per_step=args.scenes_per_step,
        distill_scenes=args.distill_scenes, shard_size=args.shard_size, pretrain_scenes=args.pretrain_scenes,
        draft_shape=DraftShape(args.draft_hidden, args.draft_layers, args.draft_heads),
        text_pretrain=steps(plan.text_pretrain, args.text_pretrain_steps),
        text_distill=steps(plan.text_distill, args.text_distill_steps),
        vlm_distill=steps(plan.vlm_distill, args.vlm_steps), draft_batch_size=args.draft_batch_size,
        max_new_tokens=args.max_new_tokens, dtype=DTYPES[args.dtype],
        eval_scenes=args.eval_scenes,
    )  # fmt: skip
    try:
        make_demo(plan)
    except (ModelLoadError, OutputsError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
