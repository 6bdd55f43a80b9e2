"""The training loop shared by the target and the drafts: AdamW, linear warmup then cosine decay, a progress bar,
periodic checkpoints, and resume.

`batches(step)` must be a pure function of the step (world_data.WorldBatches, outputs.Shuffled), so a rerun
continues from the last checkpoint (weights, optimizer moments, step) and sees the same batches an
uninterrupted run would have seen. Layout of a work directory:

    checkpoint/model.safetensors   every parameter, trainable or frozen
    checkpoint/optimizer.pt        AdamW state (tensors only; loaded with weights_only=True)
    checkpoint/state.json          {"step": n, "steps": total}
    loss.tsv                       step, loss, learning rate; one line per step
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm

from specvlm.models.loading import pick_device
from specvlm.training.examples import IGNORE, Example, collate


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.01  # matrices only; norms and biases are not decayed
    grad_clip: float = 1.0
    checkpoint_every: int = 200
    device: str = "auto"
    # Padded tokens per forward pass: a step's examples are sorted by length and run in micro-batches under this
    # budget, so short answers are not padded to the longest one (a 2-3x saving on mixed tasks).
    micro_batch_tokens: int = 2048

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98))


def last_step(work_dir: Path) -> int:
    """The step the last checkpoint in work_dir was taken at (0 when there is none)."""
    state = Path(work_dir) / "checkpoint" / "state.json"
    return json.loads(state.read_text())["step"] if state.exists() else 0


def _save(work_dir: Path, model, optimizer, step: int, steps: int) -> None:
    # Written beside the old checkpoint and swapped in, so a run killed mid-save still has a whole checkpoint.
    staging, final, old = work_dir / "checkpoint.tmp", work_dir / "checkpoint", work_dir / "checkpoint.old"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_model(model, str(staging / "model.safetensors"))
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    (staging / "state.json").write_text(json.dumps({"step": step, "steps": steps}))
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _restore(work_dir: Path, model, optimizer) -> int:
    old, final = work_dir / "checkpoint.old", work_dir / "checkpoint"
    if old.exists() and not final.exists():  # killed between the two renames of _save
        old.rename(final)
    if not (final / "state.json").exists():
        return 0
    load_model(model, str(final / "model.safetensors"), device=str(next(model.parameters()).device))
    optimizer.load_state_dict(torch.load(final / "optimizer.pt", weights_only=True))
    return json.loads((final / "state.json").read_text())["step"]


def _keep_losses_until(log: Path, step: int) -> None:
    """Drop loss lines logged after the checkpoint a resumed run restarts from, so the log has no duplicates."""
    if log.exists():
        lines = log.read_text().splitlines()
        log.write_text("".join(f"{line}\n" for line in lines if int(line.split("\t")[0]) < step))


def micro_batches(examples: list[Example], token_budget: int) -> list[list[Example]]:
    """Length-sorted chunks whose padded size (rows x longest) stays within token_budget (one example at least)."""
    chunks: list[list[Example]] = []
    for example in sorted(examples, key=lambda e: len(e.input_ids)):
        if chunks and (len(chunks[-1]) + 1) * len(example.input_ids) <= token_budget:
            chunks[-1].append(example)
        else:
            chunks.append([example])
    return chunks


def lm_step(model, examples: list[Example], config: TrainConfig, pad_id: int) -> float:
    """Forward and backward over the step's micro-batches; the gradient is that of the mean loss per answer token."""
    device = next(model.parameters()).device
    chunks = [collate(chunk, pad_id) for chunk in micro_batches(examples, config.micro_batch_tokens)]
    counts = [int((c["labels"] != IGNORE).sum()) for c in chunks]
    total, loss_sum = sum(counts), 0.0
    for chunk, count in zip(chunks, counts):
        batch = {k: v.to(device) for k, v in chunk.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        loss = model(**batch).loss * (count / total)  # the model's loss is the chunk's mean per token
        loss.backward()
        loss_sum += loss.item()
    return loss_sum


def train(
    model: torch.nn.Module,
    batches: Callable[[int], list],
    config: TrainConfig,
    work_dir: Path,
    *,
    pad_id: int | None = None,
    desc: str = "train",
    step_fn: Callable[[torch.nn.Module, list], float] | None = None,
) -> torch.nn.Module:
    """Train `model`'s trainable parameters for config.steps steps (resuming from work_dir), return it in eval mode.

    step_fn(model, items) runs forward and backward on one step's items and returns the loss; by default the
    items are Examples and the loss is the language-model loss on their answers (lm_step).
    """
    if step_fn is None:
        step_fn = lambda m, items: lm_step(m, items, config, pad_id)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    model.to(pick_device(config.device))
    optimizer = _optimizer(model, config)
    start = _restore(work_dir, model, optimizer)
    log = work_dir / "loss.tsv"
    _keep_losses_until(log, start)

    model.train()
    smoothed = None
    with (
        log.open("a") as log_file,
        tqdm(
            total=config.steps, initial=min(start, config.steps), desc=desc, mininterval=2.0, dynamic_ncols=True
        ) as bar,
    ):
        for step in range(start, config.steps):
            lr = config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            value = step_fn(model, batches(step))
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
            log_file.write(f"{step}\t{value:.5f}\t{lr:.3e}\n")
            bar.set_postfix(loss=f"{smoothed:.4f}", refresh=False)
            bar.update(1)
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                log_file.flush()
                _save(work_dir, model, optimizer, step + 1, config.steps)
    return model.eval()
