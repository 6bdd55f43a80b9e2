"""What goes into the engine and what comes out of it, and the per-row checks that keep one bad request from
failing its batch.

Stop reasons of a Result:
    eos            the target produced an end-of-sequence token (it is the last token of the output)
    max_tokens     the request's max_new_tokens were generated
    max_positions  the model's position limit came first: prompt + output fill its max_position_embeddings
    error          nothing was generated; `error` says why
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specvlm.specdec.metrics import SampleMetrics

STOP_REASONS = ("eos", "max_tokens", "max_positions", "error")


@dataclass
class Request:
    """One prompt, already processed by the target's processor (image placeholders expanded)."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None = None  # this request's image(s) as the processor made them
    image_sizes: torch.Tensor | None = None  # LLaVA-NeXT / OneVision only
    seed: int = 0  # sampling seed; each request has its own generator
    max_new_tokens: int | None = None  # None: the decoder's default
    # The image's content (a hash of its file bytes, say; never its name): requests with equal keys and equal
    # leading tokens share one prefill (prefix.py). None: the engine hashes pixel_values instead.
    image_key: str | None = None


@dataclass
class Result:
    tokens: list[int]  # generated tokens, EOS included when generation stopped on it
    stop_reason: str  # one of STOP_REASONS
    error: str | None = None
    metrics: SampleMetrics = field(default_factory=SampleMetrics)

    @classmethod
    def failed(cls, error: str) -> Result:
        return cls(tokens=[], stop_reason="error", error=error)


@dataclass(frozen=True)
class TargetSpec:
    """The facts about a target that a request must agree with."""

    image_token_id: int | None
    image_size: int | None  # square input side, where the architecture has a fixed one
    anyres: bool  # images come as crops: pixel_values [images, crops, C, H, W] plus image_sizes
    channels: int
    max_positions: int
    input_vocab: int  # rows of the input embedding table: the ids a prompt may hold

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> TargetSpec:
        config = model.config
        text = config.get_text_config()
        image_token_id = getattr(config, "image_token_id", None)
        if image_token_id is None:
            image_token_id = getattr(config, "image_token_index", None)
        vision = getattr(config, "vision_config", None)
        size = None
        anyres = getattr(config, "image_grid_pinpoints", None) is not None
        # Plain LLaVA (1.5) has one fixed-size crop per image.
        if type(model).__name__ == "LlavaForConditionalGeneration" and vision is not None:
            size = vision.image_size
        vocab = model.get_input_embeddings().num_embeddings
        channels = getattr(vision, "num_channels", 3) if vision is not None else 3
        positions = getattr(text, "max_position_embeddings", 1 << 30)
        return cls(image_token_id, size, anyres, channels, positions, vocab)


def validate(request: Request, spec: TargetSpec) -> str | None:
    """None if the request can be decoded, else a message saying what is wrong and what to do. The number of
    image features is checked later, against what the model's vision tower actually produces."""
    ids = request.input_ids
    if len(ids) == 0:
        return "empty prompt: it needs at least one token (build it with the model's processor, which adds BOS)"
    outside = [t for t in ids if not 0 <= t < spec.input_vocab]
    if outside:
        return (
            f"prompt token id {outside[0]} is outside the model's vocabulary of {spec.input_vocab}; tokenize with "
            "the target's own tokenizer"
        )
    if request.max_new_tokens is not None and request.max_new_tokens < 1:
        return f"max_new_tokens must be >= 1, got {request.max_new_tokens}"
    if len(ids) >= spec.max_positions:
        return f"prompt of {len(ids)} tokens leaves no room in the model's {spec.max_positions} positions; shorten it"
    placeholders = sum(1 for t in ids if t == spec.image_token_id) if spec.image_token_id is not None else 0
    has_image = request.pixel_values is not None
    if placeholders and not has_image:
        return f"the prompt has {placeholders} image placeholder tokens but no image was given"
    if has_image and not placeholders:
        return "an image was given but the prompt has no image placeholder; put the processor's image token in it"
    if ids[-1] == spec.image_token_id:
        return "the prompt ends with an image placeholder; add the text that follows the image (the chat template)"
    return _check_pixels(request, spec) if has_image else None


def _check_pixels(request: Request, spec: TargetSpec) -> str | None:
    pixels, shape = request.pixel_values, tuple(request.pixel_values.shape)
    advice = "preprocess the image with the target's own processor"
    dims = 5 if spec.anyres else 4
    if pixels.dim() != dims:
        layout = "[images, crops, channels, height, width]" if spec.anyres else "[images, channels, height, width]"
        return f"pixel_values has shape {shape}, the model expects {dims} dimensions {layout}; {advice}"
    if shape[-3] != spec.channels:
        return f"pixel_values has shape {shape}: {shape[-3]} channels, the model expects {spec.channels}; {advice}"
    if spec.image_size is not None and shape[-2:] != (spec.image_size, spec.image_size):
        return (
            f"pixel_values has shape {shape}, the model expects (1, {spec.channels}, {spec.image_size}, "
            f"{spec.image_size}); {advice}"
        )
    if spec.anyres:
        sizes = request.image_sizes
        if sizes is None or tuple(sizes.shape) != (shape[0], 2):
            got = None if sizes is None else tuple(sizes.shape)
            return f"image_sizes must be [{shape[0]}, 2] (height, width of each image), got {got}; {advice}"
    if not bool(torch.isfinite(pixels).all()):
        return "pixel_values contain NaN or infinite values; check the image and its preprocessing"
    return None
