"""Command line of `python -m jobs.train_draft`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

from specvlm.models.loading import DTYPES, ModelLoadError
from specvlm.training.draft import KINDS, DraftShape, train_draft
from specvlm.training.loop import TrainConfig
from specvlm.training.outputs import OutputsError


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda:0, ...")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice; on a busy machine 1 can be faster)",
    )
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the saved weights")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batch order")
    parser.add_argument(
        "--checkpoint-every", type=int, default=200, metavar="STEPS", help="save a resumable checkpoint this often"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show Hugging Face's loading bars and messages (hidden by default)"
    )


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an argument's default once, and only where there is one to show."""

    def _get_help_string(self, action):
        if action.default in (None, [], argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def apply_common_arguments(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar per checkpoint loaded: noise in a training log
        hf_logging.set_verbosity_error()


def train_draft_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.train_draft",
        description="Train a draft for a target from the target's own outputs (the Parquet a caption, vqa or mc "
        "job writes; images are read back from the input shards it names). Reruns resume from the "
        "last checkpoint in the work directory.",
        formatter_class=DefaultsFormatter,
    )
    parser.add_argument("--target", required=True, help="the target checkpoint (directory, HF cache id or URI)")
    parser.add_argument(
        "--kind",
        required=True,
        choices=KINDS,
        help="text: a small LM fed the prompt's text; vlm: a small LM and projector on the target's vision tower",
    )
    parser.add_argument(
        "--outputs",
        required=True,
        action="append",
        metavar="URI",
        help="the target's outputs: a job's output directory, a Parquet file or a glob, any fsspec URI (repeatable)",
    )
    parser.add_argument("--out", required=True, type=Path, help="where to save the draft checkpoint")
    parser.add_argument("--work-dir", type=Path, help="checkpoints and loss logs (default: <out>-work)")
    parser.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="FILE",
        help="plain text for stage 1 pretraining of a text draft, one example per line (repeatable)",
    )
    parser.add_argument("--init", help="start from this draft (or, for --kind vlm, from a text draft's LM)")
    parser.add_argument("--hidden", type=int, default=DraftShape.hidden, help="hidden size of the draft's LM")
    parser.add_argument("--layers", type=int, default=DraftShape.layers, help="layers of the draft's LM")
    parser.add_argument("--heads", type=int, default=DraftShape.heads, help="attention heads of the draft's LM")
    parser.add_argument("--pretrain-steps", type=int, default=600, help="stage 1 steps (text drafts with --text)")
    parser.add_argument("--pretrain-lr", type=float, default=3e-3, help="peak learning rate of stage 1")
    parser.add_argument("--steps", type=int, default=1000, help="distillation steps")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of distillation (AdamW)")
    parser.add_argument("--warmup", type=int, default=50, help="steps of linear learning-rate warmup, each stage")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per training step")
    parser.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec option for reading outputs and shards, e.g. endpoint_url=http://... (repeatable)",
    )
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    apply_common_arguments(args)
    options = {}
    for item in args.storage_option:
        key, _, value = item.partition("=")
        options[key] = yaml.safe_load(value)

    def config(steps: int, lr: float) -> TrainConfig:
        return TrainConfig(
            steps=steps, lr=lr, warmup=args.warmup, checkpoint_every=args.checkpoint_every, device=args.device
        )

    try:
        out = train_draft(
            target=args.target,
            kind=args.kind,
            outputs=args.outputs,
            out_dir=args.out,
            work_dir=args.work_dir,
            text_files=args.text,
            init=args.init,
            shape=DraftShape(args.hidden, args.layers, args.heads),
            pretrain=config(args.pretrain_steps, args.pretrain_lr),
            distill=config(args.steps, args.lr),
            batch_size=args.batch_size,
            seed=args.seed,
            storage_options=options,
            dtype=DTYPES[args.dtype],
        )
    except (ModelLoadError, OutputsError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"saved {args.kind} draft to {out}")
    return 0
