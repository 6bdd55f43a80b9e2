"""Training examples: a prompt followed by the answer the model must produce, the loss on the answer only.

Every kind of training here (target on the world, draft pretraining on text, draft distillation on a target's
outputs) is next-token prediction on such examples, so one collate function serves them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100  # the label of a position without loss (Hugging Face's convention)


@dataclass
class Example:
    input_ids: list[int]  # prompt then answer; image placeholders already expanded for a VLM
    answer_start: int  # index of the first answer token: the loss covers input_ids[answer_start:]
    pixel_values: torch.Tensor | None = None  # [1, 3, H, W], exactly as the target's processor made it


def answer_ids(tokenizer, text: str) -> list[int]:
    """The tokens a model generates after "ASSISTANT:" for `text`: a leading space (as in LLaVA), then EOS."""
    return tokenizer(" " + text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded model inputs with labels; pixel_values only when the examples carry images."""
    longest = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, e in enumerate(examples):
        ids = torch.tensor(e.input_ids)
        input_ids[row, : len(ids)] = ids
        labels[row, e.answer_start : len(ids)] = ids[e.answer_start :]
        attention_mask[row, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    pixels = [e.pixel_values for e in examples if e.pixel_values is not None]
    if pixels:
        if len(pixels) != len(examples):
            raise ValueError("a batch mixes examples with and without images")
        batch["pixel_values"] = torch.cat(pixels)
    return batch
