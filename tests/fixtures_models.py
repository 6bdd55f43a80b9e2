"""Tiny random-weight LLaVA families for the engine tests, built once per session.

A family is a target plus drafts with known relations to it:
  text_random  a random text-only LM on the same tokenizer         (accepts almost nothing)
  text_copy    the target's own language model, fed text only        (accepts sometimes: it misses the image)
  vlm_noisy    the target with noise on its LM weights               (accepts often, not always)
  vlm_self     an exact copy of the target                           (accepts everything)
so that every acceptance path (none, some, all) is exercised.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    GPT2Config,
    LlamaForCausalLM,
    OPTConfig,
)
from transformers.utils import logging as hf_logging

from specvlm.models.build import LlavaShape, build_llava, build_text_lm, build_tokenizer
from specvlm.specdec.drafts import Draft, ModelDraft, PromptLookupDraft
from specvlm.specdec.requests import Request
from specvlm.specdec.tree import TreeDraft, TreeSettings

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

CORPUS = [
    "a red circle on a blue square and a green triangle at the top",
    "USER: what is in the picture? ASSISTANT: a small yellow star in the center",
    "the quick brown fox jumps over the lazy dog again and again",
    "describe the image in detail, please, with colours and shapes",
] * 4

SHAPES = {
    # multi-head attention, CLS dropped, penultimate vision layer
    "mha": LlavaShape(hidden=64, layers=2, heads=4, kv_heads=4, image_size=32, patch_size=8),
    # grouped-query attention, CLS kept, last vision layer, larger images
    "gqa": LlavaShape(
        hidden=48,
        layers=3,
        heads=4,
        kv_heads=2,
        vision_hidden=48,
        image_size=48,
        patch_size=16,
        vision_feature_layer=-1,
        select_strategy="full",
    ),
    # multi-query attention, wider model, small images
    "mqa": LlavaShape(hidden=96, layers=2, heads=6, kv_heads=1, intermediate=192, image_size=24, patch_size=8),
}

QUESTIONS = [
    "what is this?",
    "describe the picture in detail, please",
    "",
    "fox",
    "a red circle",
    "what colour is the square at the top?",
    "count the shapes",
    "the lazy dog",
]


@dataclass
class Family:
    tokenizer: object
    target: torch.nn.Module
    processor: object
    drafts: dict[str, torch.nn.Module]

    @property
    def image_token_id(self) -> int:
        return self.target.config.image_token_id

    @property
    def target_vocab(self) -> int:
        return self.target.config.text_config.vocab_size

    def draft(
        self, kind: str, gamma: int = 4, tree: TreeSettings | None = None, min_confidence: float = 0.0
    ) -> Draft | None:
        """kind: none | prompt_lookup | one of self.drafts, as a chain of `gamma`, or as a tree of that depth with
        `tree` settings."""
        if kind == "none":
            return None
        if kind == "prompt_lookup":
            return PromptLookupDraft(image_token_id=self.image_token_id, device=torch.device("cpu"), gamma=gamma)
        common = dict(
            text_only=kind.startswith("text"),
            image_token_id=self.image_token_id,
            target_vocab=self.target_vocab,
            cost_ratio=0.1,
            name=kind,
            gamma=gamma,
        )
        if tree is not None:
            return TreeDraft(self.drafts[kind], tree=tree, **common)
        return ModelDraft(self.drafts[kind], min_confidence=min_confidence, **common)

    def request(self, question: str, seed: int = 0, image_seed: int = 0) -> Request:
        rng = np.random.default_rng(image_seed)
        # Odd sizes on purpose: the processor resizes and crops them to the model's input size.
        image = Image.fromarray(rng.integers(0, 255, (37 + image_seed % 20, 45, 3), dtype=np.uint8))
        enc = self.processor(images=image, text=f"USER: <image>\n{question} ASSISTANT:", return_tensors="pt")
        return Request(enc.input_ids[0].tolist(), enc.pixel_values, seed=seed)

    def requests(self, n: int) -> list[Request]:
        return [self.request(QUESTIONS[i % len(QUESTIONS)], image_seed=i) for i in range(n)]

    def reference(self, request: Request, max_new_tokens: int, eos: int | None = None) -> list[int]:
        """The target's own greedy decoding of one request, through Hugging Face generate."""
        kwargs = {} if request.pixel_values is None else {"pixel_values": request.pixel_values}
        out = self.target.generate(
            input_ids=torch.tensor([request.input_ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos if eos is not None else self.tokenizer.eos_token_id,
            pad_token_id=0,
            **kwargs,
        )
        return out[0, len(request.input_ids) :].tolist()


# Tiny text-only drafts of architectures outside the Llama family, on a family's tokenizer: GPT-2 (learned absolute
# positions, fused qkv), OPT (learned positions offset by 2, asks its cache for a length) and BLOOM (ALiBi built from
# a 2-D padding mask, which the engine's 4-D masks cannot feed).
FOREIGN_DRAFTS = {
    "gpt2": lambda vocab, special: GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=256, **special
    ),
    "opt": lambda vocab, special: OPTConfig(
        vocab_size=vocab,
        hidden_size=32,
        word_embed_proj_dim=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=256,
        **special,
    ),
    "bloom": lambda vocab, special: BloomConfig(vocab_size=vocab, hidden_size=32, n_layer=2, n_head=2, **special),
}


def build_foreign_draft(tokenizer, architecture: str, seed: int = 0) -> torch.nn.Module:
    """A random text-only causal LM of `architecture` (a key of FOREIGN_DRAFTS) over `tokenizer`'s vocabulary."""
    special = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(FOREIGN_DRAFTS[architecture](len(tokenizer), special)).eval()


def _language_model_copy(target) -> torch.nn.Module:
    lm = LlamaForCausalLM(copy.deepcopy(target.config.text_config)).eval()
    lm.model.load_state_dict(target.model.language_model.state_dict())
    lm.lm_head.load_state_dict(target.lm_head.state_dict())
    return lm


def make_family(shape: LlavaShape, seed: int = 0) -> Family:
    tokenizer = build_tokenizer(CORPUS, vocab_size=160)
    target, processor = build_llava(tokenizer, shape, seed=seed)
    noisy = copy.deepcopy(target)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in noisy.named_parameters():
            if "language_model" in name or "lm_head" in name:
                p.add_(torch.randn(p.shape, generator=generator) * p.std() * 0.3)
    drafts = {
        "text_random": build_text_lm(tokenizer, seed=seed + 2),
        "text_copy": _language_model_copy(target),
        "vlm_noisy": noisy,
        "vlm_self": copy.deepcopy(target),
    }
    return Family(tokenizer, target, processor, drafts)


@pytest.fixture(scope="session")
def families() -> dict[str, Family]:
    torch.set_num_threads(2)
    return {name: make_family(shape, seed=i) for i, (name, shape) in enumerate(SHAPES.items())}


@pytest.fixture(scope="session")
def family(families) -> Family:
    return families["mha"]


@pytest.fixture(scope="session")
def models(family, tmp_path_factory):
    """The mha family on disk, as the pipeline loads it: target/ and draft/ (the noisy VLM draft)."""
    root = tmp_path_factory.mktemp("saved-models")
    family.target.save_pretrained(root / "target")
    family.processor.save_pretrained(root / "target")
    family.drafts["vlm_noisy"].save_pretrained(root / "draft")
    family.tokenizer.save_pretrained(root / "draft")
    return root
