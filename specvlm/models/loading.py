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
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from specvlm.models.checkpoints import ModelLoadError, resolve_model_dir
from specvlm.models.compat import check_draft_kind, check_same_image_tokens
from specvlm.specdec.lean_llama import LeanLlama
from specvlm.specdec.runner import ModelRunner, causal_attend

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
        check_same_image_tokens(target.model.config.to_dict(), model.config.to_dict(), location)
    check_runs_in_the_engine(model, location)
    return model


# How far a draft's logits through the engine's cache may stray from its own forward's: rounding in its dtype.
# A forward the engine's cache or masks do not drive (ALiBi from a 2-D mask, a recurrent state) is off by O(1).
LOGIT_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}


@torch.inference_mode()
def check_runs_in_the_engine(model: torch.nn.Module, location: str) -> None:
    """The engine runs a draft of any architecture through its Hugging Face forward with the engine's own cache,
    masks and positions (and Llama-family drafts through LeanLlama). Check now, on a few tokens, that this gives
    the logits the model's own forward gives, so that an architecture it cannot drive is refused by name at load
    instead of failing, or proposing nonsense, in the middle of a job."""
    config = model.config.get_text_config()
    image_token = getattr(model.config, "image_token_id", getattr(model.config, "image_token_index", None))
    ids = [t for t in range(config.vocab_size // 2, config.vocab_size) if t != image_token][:8]  # plain text
    tokens = torch.tensor([ids], device=model.device)  # [1, 8]
    prompt = 5
    try:
        expected = model(input_ids=tokens).logits[:, prompt:].float()
        for lean in {None, LeanLlama.of(model)}:
            runner = ModelRunner(model, 1, tokens.shape[1], lean=lean)
            runner.prefill(tokens[:, :prompt], [prompt])
            step = tokens.shape[1] - prompt
            got = runner.forward(tokens[:, prompt:], causal_attend(torch.tensor([step], device=model.device), step))
            error = (got.float() - expected).abs().max() / expected.abs().max().clamp(min=1e-6)
            if not error <= LOGIT_TOLERANCE.get(model.dtype, 1e-3):
                raise ValueError(f"its logits there differ from its own forward's by {float(error):.2g} (relative)")
    except Exception as exc:
        raise ModelLoadError(
            f"draft {location!r} ({config.model_type}) cannot run in the engine, which drives a draft's forward "
            f"through its own key/value cache and masks: {type(exc).__name__}: {exc}; use a draft of a decoder-only "
            "architecture with rotary or learned positions (Llama, Mistral, Qwen2, GPT-2, OPT, ...)"
        ) from None
