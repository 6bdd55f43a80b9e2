"""The engine built from settings: target, draft and decoder, the same way for every caller (the decode actor,
the benchmark, the evaluations), so that a setting means one thing everywhere.

The settings are plain dataclasses that validate themselves; the pipeline's job config uses them as its
sections (pydantic validates dataclasses), so there is one vocabulary from YAML to the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from specvlm.specdec.tree import TreeSettings

if TYPE_CHECKING:
    from specvlm.models.loading import LoadedTarget
    from specvlm.specdec.decode import DecodeConfig, SpeculativeDecoder
    from specvlm.specdec.drafts import Draft

# The models' modules (transformers) are imported where models are built, not with the settings: a job's driver
# and its CPU workers read the settings and never build a model, and transformers alone takes seconds to import.

# draft.gamma: auto. Greedy decoding can afford a deep maximum: each step the controller drafts only as deep as
# pays (specdec/controller.py). Sampling drafts at its full depth every step, where acceptance is lower.
AUTO_DEPTH, AUTO_DEPTH_SAMPLING = 8, 4
MAX_DEPTH = 32


@dataclass(frozen=True)
class TargetSettings:
    __pydantic_config__: ClassVar[dict] = {"extra": "forbid"}  # unknown keys in a job config are errors

    target: str  # local directory, Hugging Face model id (already in the local cache), or fsspec URI
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 on a GPU, float32 on a CPU
    device: str = "auto"  # auto: cuda when available, else cpu; or "cpu", "cuda:0", ...
    trust_remote_code: bool = False  # run code a checkpoint ships (off: only the classes transformers has)
    storage_options: dict[str, Any] = field(default_factory=dict)  # settings only, never credentials


@dataclass(frozen=True)
class DraftSettings:
    __pydantic_config__: ClassVar[dict] = {"extra": "forbid"}  # unknown keys in a job config are errors

    # none: plain decoding; text: a small LM on the target's tokenizer, fed the prompt's text; vlm: a small VLM that
    # sees the image; prompt_lookup: continuations of n-grams already in the prompt (no model).
    kind: Literal["none", "text", "vlm", "prompt_lookup"] = "none"
    path: str | None = None  # text and vlm drafts
    mode: Literal["chain", "tree"] = "chain"  # tree: model drafts only
    gamma: int | Literal["auto"] = "auto"  # the deepest proposal: chain length, or tree depth
    # Each step, draft only as deep as pays on this machine at this load, down to not at all (greedy decoding).
    # false: always at full depth, which measures the draft itself (evaluations, benchmarks).
    adaptive: bool = True
    min_confidence: float = 0.0  # chain: stop drafting where the draft is less sure than this
    tree: TreeSettings = field(default_factory=TreeSettings)
    max_ngram: int = 3  # prompt lookup: the longest n-gram it matches
    min_ngram: int = 1  # prompt lookup: the shortest n-gram it matches

    def __post_init__(self):
        if self.gamma != "auto" and not 1 <= self.gamma <= MAX_DEPTH:
            raise ValueError(f"gamma must be 'auto' or between 1 and {MAX_DEPTH}, got {self.gamma}")
        if not 0.0 <= self.min_confidence < 1.0:
            raise ValueError(f"min_confidence must be in [0, 1), got {self.min_confidence}")
        if self.mode == "tree" and self.kind not in ("text", "vlm"):
            raise ValueError(f"mode 'tree' needs a model draft (kind text or vlm), not {self.kind!r}")
        if self.kind in ("text", "vlm") and not self.path:
            raise ValueError(f"path is required for a {self.kind!r} draft: its checkpoint directory or URI")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"min_ngram must be between 1 and max_ngram ({self.max_ngram}), got {self.min_ngram}")

    def depth(self, greedy: bool) -> int:
        if self.gamma != "auto":
            return self.gamma
        return AUTO_DEPTH if greedy else AUTO_DEPTH_SAMPLING

    @property
    def label(self) -> str:
        """How outputs name the draft: its kind, mode and location."""
        if self.kind in ("none", "prompt_lookup"):
            return self.kind
        return f"{self.kind}-{self.mode}:{self.path}"


def build_draft(
    settings: DraftSettings,
    target: LoadedTarget,
    *,
    greedy: bool = True,
    trust_remote_code: bool = False,
    storage_options: dict | None = None,
    lean: bool = True,
) -> Draft | None:
    """The draft the settings describe, for this target. lean=False runs a model draft's decode steps through
    Hugging Face instead of LeanLlama (for comparison)."""
    from specvlm.models.loading import decode_parameters, load_draft_model
    from specvlm.specdec.drafts import ModelDraft, PromptLookupDraft
    from specvlm.specdec.tree import TreeDraft

    depth = settings.depth(greedy)
    if settings.kind == "none":
        return None
    if settings.kind == "prompt_lookup":
        return PromptLookupDraft(
            image_token_id=target.image_token_id,
            device=target.model.device,
            gamma=depth,
            max_ngram=settings.max_ngram,
            min_ngram=settings.min_ngram,
        )
    model = load_draft_model(
        settings.kind, target, settings.path, trust_remote_code=trust_remote_code, storage_options=storage_options
    )
    common = dict(
        text_only=settings.kind == "text",
        image_token_id=target.image_token_id,
        target_vocab=target.output_vocab,
        cost_ratio=decode_parameters(model) / decode_parameters(target.model),
        name=f"{settings.kind}:{settings.path}",
        gamma=depth,
        lean=lean,
    )
    if settings.mode == "tree":
        return TreeDraft(model, tree=settings.tree, **common)
    return ModelDraft(model, min_confidence=settings.min_confidence, **common)


@dataclass
class Engine:
    target: LoadedTarget
    draft: Draft | None
    decoder: SpeculativeDecoder


def build_engine(
    target: TargetSettings | LoadedTarget, draft: DraftSettings, decode: DecodeConfig, lean: bool = True
) -> Engine:
    """Target (loaded here unless given loaded), draft and decoder."""
    from specvlm.models.loading import load_target
    from specvlm.specdec.decode import SpeculativeDecoder

    if isinstance(target, TargetSettings):
        options = target.storage_options
        loaded = load_target(
            target.target,
            device=target.device,
            dtype=target.dtype,
            trust_remote_code=target.trust_remote_code,
            storage_options=options,
        )
        built = build_draft(
            draft,
            loaded,
            greedy=decode.sampling.greedy,
            trust_remote_code=target.trust_remote_code,
            storage_options=options,
            lean=lean,
        )
    else:
        loaded = target
        built = build_draft(draft, loaded, greedy=decode.sampling.greedy, lean=lean)
    return Engine(loaded, built, SpeculativeDecoder(loaded.model, built, decode))
