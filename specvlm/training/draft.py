"""Training a draft for a target: the body of `jobs/train_draft`.

Two kinds, as in Gagrani, Goel et al., "On Speculative Decoding for Multimodal Large Language Models":
  text  a small Llama LM on the target's tokenizer. Stage 1 pretrains it from scratch on plain text (one
        example per line); stage 2 distills it on the target's own outputs, fed the prompt without the image.
  vlm   a LlavaForConditionalGeneration whose vision tower is a frozen copy of the target's (same config, same
        weights: it reads the same pixels and yields the same number of image tokens, and loads standalone),
        with its own projector and small LM, trained on the target's outputs. Its LM may start from a text
        draft (their ft-llava starts from its chat-tuned text draft).
Each stage checkpoints into the work directory and resumes from it; the result is an HF checkpoint
(safetensors) with the tokenizer (and for a VLM draft the processor) saved beside it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from specvlm.models.build import build_text_lm
from specvlm.models.loading import ModelLoadError, check_vocabulary, load_target, resolve_model_dir
from specvlm.models.saving import save_checkpoint
from specvlm.specdec.drafts import strip_image_tokens
from specvlm.training.examples import Example
from specvlm.training.loop import TrainConfig, last_step, train
from specvlm.training.outputs import Shuffled, check_tokenizer, load_images, read_outputs, text_examples, vlm_examples

KINDS = ("text", "vlm")


@dataclass(frozen=True)
class DraftShape:
    hidden: int = 128
    # One layer: on a CPU a draft call costs per layer, and on the demo family a second layer moved tau by under 2%
    # (VLM draft, gamma 5) while it cut the speedup at batch 1 from 1.63x to 1.37x.
    layers: int = 1
    heads: int = 4


def build_text_draft(tokenizer, shape: DraftShape, seed: int = 0) -> LlamaForCausalLM:
    return build_text_lm(tokenizer, hidden=shape.hidden, layers=shape.layers, heads=shape.heads, seed=seed)


def build_vlm_draft(
    target: LlavaForConditionalGeneration,
    tokenizer,
    shape: DraftShape,
    seed: int = 0,
    language_model: LlamaForCausalLM | None = None,
) -> LlavaForConditionalGeneration:
    """A small LLaVA on the target's frozen vision tower; its LM is `language_model`'s weights when given."""
    lm = language_model or build_text_draft(tokenizer, shape, seed)
    t = target.config
    config = LlavaConfig(
        vision_config=copy.deepcopy(t.vision_config),
        text_config=copy.deepcopy(lm.config),
        image_token_id=t.image_token_id,
        vision_feature_layer=t.vision_feature_layer,
        vision_feature_select_strategy=t.vision_feature_select_strategy,
        projector_hidden_act=t.projector_hidden_act,
    )
    torch.manual_seed(seed)
    draft = LlavaForConditionalGeneration(config)
    draft.model.vision_tower.load_state_dict(target.model.vision_tower.state_dict())
    draft.model.vision_tower.requires_grad_(False)
    draft.model.language_model.load_state_dict(lm.model.state_dict())
    draft.lm_head.load_state_dict(lm.lm_head.state_dict())
    draft.generation_config.eos_token_id = tokenizer.eos_token_id
    draft.generation_config.pad_token_id = tokenizer.pad_token_id
    return draft


def pretrain_examples(lines: Iterable[str], tokenizer, image_token_id: int | None) -> list[Example]:
    """One example per non-empty line: BOS, the line, EOS; the loss on everything after BOS."""
    examples = []
    for line in lines:
        if line.strip():
            ids = strip_image_tokens(tokenizer(line.strip()).input_ids, image_token_id) + [tokenizer.eos_token_id]
            examples.append(Example(ids, 1))
    if not examples:
        raise ValueError("the pretraining text has no non-empty lines")
    return examples


def _load_init(init: str, kind: str, tokenizer, target_model, shape: DraftShape, seed: int):
    """The model to start from: a text LM (for either kind) or, for kind vlm, a VLM draft to fine-tune."""
    path = resolve_model_dir(init)
    try:
        init_tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        raise ModelLoadError(f"init checkpoint {init!r} has no tokenizer files; save its tokenizer beside it") from None
    check_vocabulary(tokenizer, init_tokenizer, init)
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type == "llava":
        if kind != "vlm":
            raise ModelLoadError(f"init checkpoint {init!r} is a VLM; a text draft starts from a text LM")
        return AutoModelForImageTextToText.from_pretrained(path, use_safetensors=True, dtype=torch.float32)
    lm = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=torch.float32)
    return lm if kind == "text" else build_vlm_draft(target_model, tokenizer, shape, seed, language_model=lm)


def _check_work_dir(work_dir: Path, tokenizer, target: str) -> None:
    """A resumed run must be training for the same target: its saved tokenizer must match the target's."""
    saved = work_dir / "tokenizer"
    if saved.exists():
        check_vocabulary(tokenizer, AutoTokenizer.from_pretrained(saved), f"{work_dir} (resumed run)")
    else:
        tokenizer.save_pretrained(saved)


def train_draft(
    *,
    target: str,
    kind: str,
    outputs: list[str],
    out_dir: Path,
    work_dir: Path | None = None,
    text_files: list[str] = (),
    text_lines: Iterable[str] | None = None,
    init: str | None = None,
    shape: DraftShape = DraftShape(),
    pretrain: TrainConfig | None = None,
    distill: TrainConfig,
    batch_size: int = 32,
    seed: int = 0,
    storage_options: dict | None = None,
    dtype: torch.dtype = torch.float32,
    log=print,
) -> Path:
    """Train a `kind` draft for `target` on the outputs Parquet files, save it to out_dir, return out_dir."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    out_dir = Path(out_dir)
    work_dir = Path(work_dir) if work_dir else out_dir.with_name(out_dir.name + "-work")
    work_dir.mkdir(parents=True, exist_ok=True)

    # A text draft needs only the target's tokenizer and config; a VLM draft needs its vision tower too.
    target_path = resolve_model_dir(target)
    if kind == "vlm":
        loaded = load_target(target, device="cpu", dtype="float32")
        target_model, processor = loaded.model, loaded.processor
        tokenizer, image_token_id = loaded.tokenizer, loaded.image_token_id
    else:
        target_model, processor = None, None
        tokenizer = AutoTokenizer.from_pretrained(target_path)
        config = AutoConfig.from_pretrained(target_path)
        image_token_id = getattr(config, "image_token_id", getattr(config, "image_token_index", None))
    _check_work_dir(work_dir, tokenizer, target)

    rows = read_outputs(list(outputs), storage_options)
    check_tokenizer(rows, tokenizer, target)
    log(f"{len(rows)} target outputs for distillation")

    if init:
        model = _load_init(init, kind, tokenizer, target_model, shape, seed)
    elif kind == "text":
        model = build_text_draft(tokenizer, shape, seed)
    else:
        model = build_vlm_draft(target_model, tokenizer, shape, seed)

    lines = list(text_lines or [])
    for name in text_files:
        with open(name, encoding="utf-8") as f:
            lines += f.read().splitlines()
    pretrains = kind == "text" and bool(lines) and pretrain is not None and pretrain.steps > 0
    if pretrains:
        examples = pretrain_examples(lines, tokenizer, image_token_id)
        log(f"stage 1: pretraining on {len(examples)} lines of text")
        model = train(
            model,
            Shuffled(examples, batch_size, seed),
            pretrain,
            work_dir / "pretrain",
            pad_id=tokenizer.pad_token_id,
            desc="pretrain",
        )

    if kind == "text":
        examples = text_examples(rows, tokenizer, image_token_id)
    else:
        examples = vlm_examples(rows, processor, load_images(rows, storage_options))
    log(
        f"stage 2: distilling on {len(examples)} target outputs"
        + (f" (resuming at step {last_step(work_dir / 'distill')})" if last_step(work_dir / "distill") else "")
    )
    model = train(
        model,
        Shuffled(examples, batch_size, seed + 1),
        distill,
        work_dir / "distill",
        pad_id=tokenizer.pad_token_id,
        desc="distill",
    )

    save_checkpoint(model, processor if kind == "vlm" else tokenizer, out_dir, dtype)
    (out_dir / "draft_training.json").write_text(
        json.dumps(
            {
                "kind": kind,
                "target": target,
                "outputs": list(outputs),
                "rows": len(rows),
                "init": init,
                "shape": asdict(shape),
                "pretrain_lines": len(lines),
                "pretrain_steps": pretrain.steps if pretrains else 0,  # stage 1 runs for text drafts given text
                "distill_steps": distill.steps,
                "batch_size": batch_size,
                "seed": seed,
            },
            indent=2,
        )
    )
    return out_dir
