"""Prefill: new requests' prompts into a cache of their own, with each request's image features checked.

The vision tower runs once for all new requests together, through the model's own `get_image_features`. Each
request's features are counted against its image placeholders before any language-model pass: in a batched
forward the model only checks the batch's total, so a request short of features next to one with too many would
silently trade features with it, and any other mismatch fails the whole batch. The checked features are then put
in place of the placeholders, in order, exactly as the model's forward does, and the prompts run through the
language model in one pass. The caller copies the prefilled rows into its running batch (ModelRunner.take_rows).
"""

from __future__ import annotations

import inspect

import torch

from specvlm.specdec.lean_llama import LeanLlama
from specvlm.specdec.requests import Request
from specvlm.specdec.runner import ModelRunner

# Vision settings a model's get_image_features takes, read from its config (older transformers releases do not
# fill them in by themselves).
VISION_SETTINGS = ("vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio")


def image_token_id(model: torch.nn.Module) -> int | None:
    config = model.config
    token = getattr(config, "image_token_id", None)
    return getattr(config, "image_token_index", None) if token is None else token


def image_inputs(requests: list[Request], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's image kwargs (pixel_values, image_sizes) for the images of `requests`, in order; requests
    without an image contribute none."""
    with_image = [r for r in requests if r.pixel_values is not None]
    if not with_image:
        return {}
    pixels = [r.pixel_values for r in with_image]
    if pixels[0].dim() == 5:
        # LLaVA-NeXT style [images, crops, C, H, W]: the crop count varies per image; pad it like the processor
        # does, the model drops the padding using image_sizes.
        most = max(p.shape[1] for p in pixels)
        pixels = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[1])) for p in pixels]
    inputs = {"pixel_values": torch.cat(pixels).to(device=model.device, dtype=model.dtype)}
    if with_image[0].image_sizes is not None:
        inputs["image_sizes"] = torch.cat([r.image_sizes for r in with_image]).to(model.device)
    return inputs


def _collate(requests: list[Request], model: torch.nn.Module) -> dict:
    """get_image_features' inputs for all images of `requests`, in order."""
    inputs = image_inputs(requests, model)
    parameters = inspect.signature(model.get_image_features).parameters
    if "image_sizes" in inputs and "batch_num_images" in parameters:
        inputs["batch_num_images"] = torch.tensor([len(r.pixel_values) for r in requests])
    for name in VISION_SETTINGS:
        if name in parameters and getattr(model.config, name, None) is not None:
            inputs[name] = getattr(model.config, name)
    return inputs


def _features_of(requests: list[Request], model: torch.nn.Module) -> list[torch.Tensor]:
    """Each request's image features [tokens, hidden], its images' features concatenated in order."""
    out = model.get_image_features(**_collate(requests, model))
    per_image = getattr(out, "pooler_output", out)
    if isinstance(per_image, torch.Tensor):  # [images, tokens, hidden] from fixed-size towers
        per_image = list(per_image) if per_image.dim() == 3 else [per_image]
    per_image = list(per_image)
    features, start = [], 0
    for r in requests:
        count = len(r.pixel_values)
        features.append(torch.cat(per_image[start : start + count]))
        start += count
    return features


def image_features(requests: list[Request], model: torch.nn.Module) -> list[torch.Tensor | str | None]:
    """Per request: its image features [tokens, hidden], None when it has no image, or an error message."""
    result: list[torch.Tensor | str | None] = [None] * len(requests)
    with_image = [i for i, r in enumerate(requests) if r.pixel_values is not None]
    if not with_image:
        return result
    try:
        features = _features_of([requests[i] for i in with_image], model)
    except Exception:  # one malformed image must not fail the others: retry one by one
        features = []
        for i in with_image:
            try:
                features += _features_of([requests[i]], model)
            except Exception as exc:
                features.append(
                    f"the vision tower cannot read this image ({type(exc).__name__}: {exc}); "
                    "preprocess it with the target's own processor"
                )
    token = image_token_id(model)
    for i, found in zip(with_image, features):
        placeholders = sum(1 for t in requests[i].input_ids if t == token)
        if isinstance(found, torch.Tensor) and len(found) != placeholders:
            found = (
                f"the prompt has {placeholders} image placeholder tokens, the model expects {len(found)} for this "
                "image; build the prompt with the target's own processor from the same image"
            )
        result[i] = found
    return result


def prefill(
    model: torch.nn.Module,
    requests: list[Request],
    prompts: list[list[int]],
    capacity: int,
    use_images: bool = True,
    lean: LeanLlama | None = None,
) -> tuple[ModelRunner, list[int], dict[int, str]]:
    """Cache every prompt but its last token (the first decode step feeds that one, like every later last token).

    prompts[i] is what the model reads for requests[i] (the request's ids, or a draft's own view of them).
    Returns a runner holding the good requests in rows [0, len(good)), the indices of the good requests, and an
    error message for each of the others.
    """
    features = image_features(requests, model) if use_images else [None] * len(requests)
    errors = {i: f for i, f in enumerate(features) if isinstance(f, str)}
    good = [i for i in range(len(requests)) if i not in errors]
    runner = ModelRunner(model, max(1, len(good)), capacity, lean=lean)
    if not good:
        return runner, good, errors
    lengths = [len(prompts[i]) for i in good]
    width = max(lengths) - 1
    tokens = torch.zeros(len(good), width, dtype=torch.long, device=model.device)
    for row, i in enumerate(good):
        prompt = torch.tensor(prompts[i][:width], device=model.device)
        tokens[row, : len(prompt)] = prompt
    embeds = None
    images = [features[i] for i in good if features[i] is not None]
    if images:
        token = image_token_id(model)
        cached = torch.tensor(lengths, device=model.device) - 1
        prompt_part = torch.arange(width, device=model.device)[None, :] < cached[:, None]
        placeholders = (tokens == token) & prompt_part
        table = model.get_input_embeddings()
        # Placeholder ids may lie outside the embedding table; their embeddings are replaced anyway.
        embeds = table(tokens.masked_fill(placeholders, 0) if token >= table.num_embeddings else tokens)
        embeds[placeholders] = torch.cat(images).to(embeds.dtype)
    runner.prefill(tokens, [length - 1 for length in lengths], inputs_embeds=embeds)
    return runner, good, errors
