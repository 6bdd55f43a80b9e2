"""What the checkpoints' config.json files say about a draft for a target, before any weights load: its kind, its
vocabulary size, and for a VLM draft how it expands an image. Plain dicts, no transformers: the job's preflight
runs these checks in the driver, which loads no model code."""

from __future__ import annotations

from specvlm.models.checkpoints import ModelLoadError


def check_target_kind(config: dict, location: str) -> None:
    """The target is an image-text model: a text-only LM there would load its weights and then fail for want of
    an image processor, minutes in. config: the checkpoint's config.json."""
    if "vision_config" not in config:
        architectures = ", ".join(config.get("architectures") or []) or "no architectures listed"
        raise ModelLoadError(
            f"{location!r} is a text-only model ({config.get('model_type')}: {architectures}), not a "
            "vision-language model; the target must be a LLaVA-family vision-language model (its config.json has "
            "a vision_config, e.g. llava-hf/llava-1.5-7b-hf); a text-only LM can serve as the draft (draft.kind=text)"
        )


def check_draft_kind(kind: str, config: dict, location: str) -> None:
    """A text draft is a causal LM, a VLM draft an image-text model: say so before anything loads the weights.
    config: the checkpoint's config.json."""
    is_vlm = "vision_config" in config
    if kind == "text" and is_vlm:
        raise ModelLoadError(
            f"draft {location!r} is a vision-language model ({config.get('model_type')}), not a text-only LM; "
            "set draft.kind=vlm, or point draft.path at a text-only draft"
        )
    if kind == "vlm" and not is_vlm:
        raise ModelLoadError(
            f"draft {location!r} is a text-only model ({config.get('model_type')}), not a vision-language model; "
            "set draft.kind=text, or point draft.path at a VLM draft"
        )


# Vocabulary sizes of one tokenizer differ only by the padding of the embedding tables (LLaVA-1.5: 32064 against
# its Vicuna drafts' 32000; Qwen2 7B against 0.5B: 128 rows), well under this share of the vocabulary. Another
# tokenizer family differs by more (Llama 32000 against Mistral 32768).
VOCAB_PADDING_SHARE = 0.01


def check_draft_fits(kind: str, draft_config: dict, target_config: dict, location: str) -> None:
    """What the checkpoints' config.json files alone say about a draft for this target, before any weights load:
    its kind, a vocabulary of the target's size (up to padding), and for a VLM draft the target's image
    expansion. The token-by-token vocabulary check needs the tokenizers and runs when the draft loads."""
    check_draft_kind(kind, draft_config, location)
    draft_vocab = draft_config.get("text_config", draft_config).get("vocab_size")
    target_vocab = target_config.get("text_config", target_config).get("vocab_size")
    if draft_vocab and target_vocab and abs(draft_vocab - target_vocab) > VOCAB_PADDING_SHARE * target_vocab:
        raise ModelLoadError(
            f"draft {location!r} has a vocabulary of {draft_vocab} tokens, the target {target_vocab}: it was built "
            "on another tokenizer; a draft must use the target's tokenizer"
        )
    if kind == "vlm":
        check_same_image_tokens(target_config, draft_config, location)


def check_same_image_tokens(target: dict, draft: dict, location: str) -> None:
    """A VLM draft reads the target's prompt and pixels as they are, so both must expand an image alike.
    target, draft: the models' configs as dicts. A fact missing from either side is not compared: a config.json
    leaves out the values that are its class's defaults (loaded models' full configs have them all)."""
    t_vision, d_vision = target.get("vision_config", {}), draft.get("vision_config", {})
    facts = {
        "image_token_id": (_image_token(target), _image_token(draft)),
        # How many features an image becomes: which tower outputs are kept, and for anyres models (LLaVA-NeXT,
        # OneVision) the crop grid an image size maps to and how far OneVision pools the crops.
        **{f: (_plain(target.get(f)), _plain(draft.get(f))) for f in IMAGE_EXPANSION},
        **{f"vision_config.{f}": (t_vision.get(f), d_vision.get(f)) for f in ("image_size", "patch_size")},
    }
    differ = [name for name, (t, d) in facts.items() if t is not None and d is not None and t != d]
    if differ:
        raise ModelLoadError(
            f"VLM draft {location!r} does not read images like the target ({', '.join(differ)} differ); "
            "use a draft built on the target's vision settings, or a text-only draft"
        )


IMAGE_EXPANSION = ("vision_feature_select_strategy", "image_grid_pinpoints", "vision_aspect_ratio")


def _plain(value):
    """Tuples as lists (a config in memory may hold either; its JSON holds lists), so that equal values compare
    equal."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _image_token(config: dict):
    return config.get("image_token_id", config.get("image_token_index"))
