"""Building LLaVA-family models from scratch: the tiny random models of the tests, the demo family before
training, and real-size random models for GPU benchmarks. Everything saves and loads through the standard
Hugging Face classes, so the engine loads these exactly like a downloaded checkpoint."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


def build_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus`, with LLaVA's special tokens (BOS added on encode)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


@dataclass(frozen=True)
class LlavaShape:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4  # < heads for grouped-query attention
    intermediate: int = 128
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    image_size: int = 32
    patch_size: int = 8
    vision_feature_layer: int = -2
    select_strategy: str = "default"  # "default" drops CLS, "full" keeps it
    max_positions: int = 2048


def build_llava(
    tokenizer: PreTrainedTokenizerFast, shape: LlavaShape, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised LLaVA (CLIP vision tower + projector + Llama LM) and its processor."""
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=shape.vision_hidden * 2,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=shape.vision_feature_layer,
        vision_feature_select_strategy=shape.select_strategy,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    side = shape.image_size
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"height": side, "width": side}, crop_size={"height": side, "width": side}
        ),
        tokenizer=tokenizer,
        patch_size=shape.patch_size,
        vision_feature_select_strategy=shape.select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token
    )
    return model, processor


def build_text_lm(
    tokenizer: PreTrainedTokenizerFast,
    hidden: int = 32,
    layers: int = 1,
    heads: int = 2,
    kv_heads: int | None = None,
    seed: int = 0,
    max_positions: int = 2048,
) -> LlamaForCausalLM:
    """A randomly initialised Llama causal LM over `tokenizer`'s vocabulary (a text-only draft)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()
