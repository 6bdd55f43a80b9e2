"""Loading targets and drafts from a local directory, the Hugging Face cache, or an fsspec URI.

Weights load from safetensors only, and no repository code runs unless the config allows it explicitly.
A URI (s3://, gs://, ...) is copied once per node into a local cache directory and loaded from there
(models/checkpoints.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from specvlm.models.checkpoints import ModelLoadError, resolve_model_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _require_safetensors(path: Path) -> None:
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(
            f"{path} has no *.safetensors weights; only safetensors are loaded (convert the checkpoint first)"
        )


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def decode_parameters(model: torch.nn.Module) -> int:
    """Parameters touched per decoded token: the vision tower and projector run once, at prefill."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if "vision_tower" not in name and "multi_modal_projector" not in name
    )


@dataclass
class LoadedTarget:
    model: torch.nn.Module
    processor: object  # the checkpoint's AutoProcessor
    location: str

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_token_id(self) -> int | None:
        config = self.model.config
        return getattr(config, "image_token_id", getattr(config, "image_token_index", None))

    @property
    def output_vocab(self) -> int:
        """The width of the target's logits (its output embedding rows)."""
        return self.model.get_output_embeddings().weight.shape[0]


def _load_kwargs(dtype: torch.dtype, trust_remote_code: bool) -> dict:
    return {"dtype": dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code}


def load_target(
    location: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    storage_options: dict | None = None,
) -> LoadedTarget:
    path = resolve_model_dir(location, storage_options=storage_options)
    _require_safetensors(path)
    dev = pick_device(device)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path, **_load_kwargs(pick_dtype(dtype, dev), trust_remote_code)
        )
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise ModelLoadError(f"cannot load target {location!r} as an image-text-to-text model: {exc}") from None
    return LoadedTarget(model.to(dev).eval(), processor, location)


def check_vocabulary(target_tokenizer, draft_tokenizer, draft_location: str) -> None:
    """Every token the draft knows must have the same id in the target's vocabulary (the target may add
    special tokens of its own, like <image>), or verification would compare different strings."""
    target_vocab = target_tokenizer.get_vocab()
    wrong = [(tok, i) for tok, i in draft_tokenizer.get_vocab().items() if target_vocab.get(tok) != i]
    if wrong:
        tok, i = wrong[0]
        raise ModelLoadError(
            f"draft {draft_location!r} does not share the target's vocabulary: {len(wrong)} tokens differ "
            f"(e.g. {tok!r} is id {i} in the draft, {target_vocab.get(tok)} in the target); a draft must use "
            "the target's tokenizer"
        )


DRAFT_MODEL_KINDS = ("text", "vlm")


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


def load_draft_model(
    kind: str,
    target: LoadedTarget,
    location: str,
    *,
    trust_remote_code: bool = False,
    storage_options: dict | None = None,
) -> torch.nn.Module:
    """A draft's model (kind text or vlm), on the target's device and in its dtype, checked against the target:
    same vocabulary, and for a VLM draft the same image expansion."""
    if kind not in DRAFT_MODEL_KINDS:
        raise ModelLoadError(f"draft kind {kind!r} has no model; model drafts are {', '.join(DRAFT_MODEL_KINDS)}")
    if not location:
        raise ModelLoadError(f"a {kind!r} draft needs a model path")
    path = resolve_model_dir(location, storage_options=storage_options)
    _require_safetensors(path)
    check_draft_kind(kind, json.loads((path / "config.json").read_text()), location)
    try:
        draft_tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        raise ModelLoadError(
            f"draft {location!r} has no tokenizer files, so its vocabulary cannot be checked against the "
            "target's; save the tokenizer it was trained with next to its weights"
        ) from None
    check_vocabulary(target.tokenizer, draft_tokenizer, location)
    auto = AutoModelForCausalLM if kind == "text" else AutoModelForImageTextToText
    try:
        model = auto.from_pretrained(path, **_load_kwargs(target.model.dtype, trust_remote_code))
    except ValueError as exc:
        raise ModelLoadError(f"cannot load {kind!r} draft {location!r}: {exc}") from None
    model = model.to(target.model.device).eval()
    if kind == "vlm":
        _check_same_image_tokens(target.model.config.to_dict(), model.config.to_dict(), location)
    return model


# Vocabulary sizes of one tokenizer differ only by the padding of the embedding tables (LLaVA-1.5: 32064 against
# its Vicuna drafts' 32000; Qwen2 7B against 0.5B: 128 rows), well under this share of the vocabulary. Another
# tokenizer family differs by more (Llama 32000 against Mistral 32768).
VOCAB_PADDING_SHARE = 0.01


def check_draft_fits(kind: str, draft_config: dict, target_config: dict, location: str) -> None:
    """What the checkpoints' config.json files alone say about a draft for this target, before any weights load:
    its kind, a vocabulary of the target's size (up to padding), and for a VLM draft the target's image
    expansion. The token-by-token vocabulary check needs the tokenizers and runs when the draft loads."""
    check_draft_kind(kind, draft_config, location)
    draft_config, target_config = _with_defaults(draft_config), _with_defaults(target_config)
    draft_vocab = draft_config.get("text_config", draft_config).get("vocab_size")
    target_vocab = target_config.get("text_config", target_config).get("vocab_size")
    if draft_vocab and target_vocab and abs(draft_vocab - target_vocab) > VOCAB_PADDING_SHARE * target_vocab:
        raise ModelLoadError(
            f"draft {location!r} has a vocabulary of {draft_vocab} tokens, the target {target_vocab}: it was built "
            "on another tokenizer; a draft must use the target's tokenizer"
        )
    if kind == "vlm":
        _check_same_image_tokens(target_config, draft_config, location)


def _with_defaults(config: dict) -> dict:
    """A config.json with the defaults it leaves out filled in (transformers saves only what differs from them)."""
    try:
        return AutoConfig.for_model(**config).to_dict()
    except (ValueError, TypeError, KeyError):  # a model type this transformers does not know: compare what is there
        return config


def _check_same_image_tokens(target: dict, draft: dict, location: str) -> None:
    """A VLM draft reads the target's prompt and pixels as they are, so both must expand an image alike.
    target, draft: the models' configs as dicts."""
    image_token = lambda config: config.get("image_token_id", config.get("image_token_index"))
    differ = ["image_token_id"] if image_token(target) != image_token(draft) else []
    differ += [f for f in ("vision_feature_select_strategy",) if target.get(f) != draft.get(f)]
    t_vision, d_vision = target.get("vision_config", {}), draft.get("vision_config", {})
    differ += [f"vision_config.{f}" for f in ("image_size", "patch_size") if t_vision.get(f) != d_vision.get(f)]
    if differ:
        raise ModelLoadError(
            f"VLM draft {location!r} does not read images like the target ({', '.join(differ)} differ); "
            "use a draft built on the target's vision settings, or a text-only draft"
        )
