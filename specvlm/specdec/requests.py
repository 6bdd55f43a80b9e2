"""What goes into the engine and what comes out of it, and the per-row checks that keep one bad request from
failing its batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specvlm.specdec.metrics import SampleMetrics


@dataclass
class Request:
    """One prompt, already processed by the target's processor (image placeholders expanded)."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None = None  # this request's image as the processor made it, batch dim 1
    image_sizes: torch.Tensor | None = None  # LLaVA-NeXT / OneVision only
    seed: int = 0  # sampling seed; each request has its own generator


@dataclass
class Result:
    tokens: list[int]  # generated tokens, EOS included when generation stopped on it
    stop_reason: str  # "eos" | "max_tokens" | "error"
    error: str | None = None
    metrics: SampleMetrics = field(default_factory=SampleMetrics)

    @classmethod
    def failed(cls, error: str) -> Result:
        return cls(tokens=[], stop_reason="error", error=error)


@dataclass(frozen=True)
class TargetSpec:
    """The facts about a target that a request must agree with."""

    image_token_id: int | None
    image_tokens_per_image: int | None  # None where it depends on the image (LLaVA-NeXT anyres)
    image_size: int | None  # square input side, where the architecture has a fixed one
    max_positions: int
    vocab_size: int  # rows of the input embedding table

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> TargetSpec:
        config = model.config
        text = config.get_text_config()
        image_token_id = getattr(config, "image_token_id", None)
        if image_token_id is None:
            image_token_id = getattr(config, "image_token_index", None)
        vision = getattr(config, "vision_config", None)
        per_image = size = None
        # Plain LLaVA (1.5) has one fixed-size crop per image: check its shape and token count exactly.
        if type(model).__name__ == "LlavaForConditionalGeneration" and vision is not None:
            size = vision.image_size
            per_image = (vision.image_size // vision.patch_size) ** 2
            if config.vision_feature_select_strategy == "full":
                per_image += 1  # the CLS token is kept
        vocab = model.get_input_embeddings().num_embeddings
        return cls(image_token_id, per_image, size, getattr(text, "max_position_embeddings", 1 << 30), vocab)


def validate(request: Request, spec: TargetSpec, max_new_tokens: int) -> str | None:
    """None if the request can be decoded, else a message saying what is wrong and what to do."""
    ids = request.input_ids
    if len(ids) == 0:
        return "empty prompt: it needs at least one token (build it with the model's processor, which adds BOS)"
    outside = [t for t in ids if not 0 <= t < spec.vocab_size]
    if outside:
        return (
            f"prompt token id {outside[0]} is outside the model's vocabulary of {spec.vocab_size}; tokenize with "
            "the target's own tokenizer"
        )
    placeholders = sum(1 for t in ids if t == spec.image_token_id) if spec.image_token_id is not None else 0
    has_image = request.pixel_values is not None
    if placeholders and not has_image:
        return f"the prompt has {placeholders} image placeholder tokens but no image was given"
    if has_image and not placeholders:
        return "an image was given but the prompt has no image placeholder; put the processor's image token in it"
    if has_image and spec.image_size is not None:
        shape = tuple(request.pixel_values.shape)
        if len(shape) != 4 or shape[0] != 1 or shape[-2:] != (spec.image_size, spec.image_size):
            return (
                f"pixel_values has shape {shape}, the model expects (1, 3, {spec.image_size}, {spec.image_size}); "
                "preprocess the image with the target's own processor"
            )
    if has_image and spec.image_tokens_per_image is not None and placeholders != spec.image_tokens_per_image:
        return (
            f"the prompt has {placeholders} image placeholder tokens, the model expects "
            f"{spec.image_tokens_per_image} for one image; build the prompt with the target's own processor"
        )
    if ids[-1] == spec.image_token_id:
        return "the prompt ends with an image placeholder; add the text that follows the image (the chat template)"
    if len(ids) + max_new_tokens > spec.max_positions:
        return (
            f"prompt of {len(ids)} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
            f"{spec.max_positions} positions; shorten the prompt or lower max_new_tokens"
        )
    return None


def collate_images(requests: list[Request], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s kwargs carrying the images of `requests`, in row order (rows without an image contribute none)."""
    pixels = [r.pixel_values for r in requests if r.pixel_values is not None]
    if not pixels:
        return {}
    if pixels[0].dim() == 5:
        # LLaVA-NeXT style [1, patches, 3, H, W]: the patch count varies per image, pad it like the processor
        # does; the model drops the padding using image_sizes.
        most = max(p.shape[1] for p in pixels)
        pixels = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[1])) for p in pixels]
    inputs = {"pixel_values": torch.cat(pixels).to(device=model.device, dtype=model.dtype)}
    sizes = [r.image_sizes for r in requests if r.image_sizes is not None]
    if sizes:
        inputs["image_sizes"] = torch.cat(sizes).to(model.device)
    return inputs
