"""A Llama-family decoder forward written as plain tensor operations, for the draft's decode steps.

Why: a draft is small, so its forward costs framework overhead rather than arithmetic. Through Hugging Face
a one-layer draft runs ~60 modules, mask/rotary helpers and a multimodal wrapper per call, which made one
draft call cost a quarter of a 4-layer target call (c ~ 0.26 on the demo family) although it does a
twentieth of the work. Speculative speedup is bounded by tau / (r + gamma * c), so c is paid gamma times per
step. This forward does the same mathematics with a few fused tensors per layer (q/k/v as one matmul,
gate/up as one), reusing the engine's SlotKVCache, positions and masks.

It is used for the draft only. The target always runs through Hugging Face, whose outputs are the reference
that lossless decoding must reproduce; the draft may differ from its Hugging Face forward by float rounding
and losslessness still holds (the verifier decides every token). tests/test_lean_llama.py checks that the
two forwards agree to rounding.

Covers Llama, Mistral and Qwen2 language models (the families of common drafts): RMSNorm, rotary position
embeddings of the default type, SiLU-gated MLP, grouped-query attention, optional attention biases. Anything
else (other rotary scalings, sliding windows, other activations) returns None from `LeanLlama.of` and the
caller keeps the Hugging Face forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specvlm.specdec.float32_head import float32_rms_logits

SUPPORTED = ("llama", "mistral", "qwen2")


def _hold(module: torch.nn.Module, **weights: torch.Tensor | None) -> None:
    """Keep the weights as buffers of the module (views of the model's own where nothing is fused), so that a
    compiled forward with frozen weights treats them as the constants they are."""
    for name, weight in weights.items():
        module.register_buffer(name, None if weight is None else weight.detach(), persistent=False)


class _Layer(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        biases = [p.bias for p in projections]
        _hold(
            self,
            input_norm=layer.input_layernorm.weight,
            qkv=torch.cat([p.weight for p in projections]),  # [(heads + 2 * kv_heads) * head_dim, hidden]
            qkv_bias=torch.cat(biases) if all(b is not None for b in biases) else None,
            out=attn.o_proj.weight,
            out_bias=attn.o_proj.bias,
            post_norm=layer.post_attention_layernorm.weight,
            gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),  # [2 * intermediate, hidden]
            down=mlp.down_proj.weight,
        )


class LeanLlama(torch.nn.Module):
    def __init__(self, decoder: torch.nn.Module, lm_head: torch.nn.Module, config):
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        inv_freq = decoder.rotary_emb.inv_freq.float()
        half = self.head_dim // 2
        _hold(
            self,
            embed=decoder.embed_tokens.weight,
            final_norm=decoder.norm.weight,
            lm_head=lm_head.weight,
            inv_freq=torch.cat([inv_freq, inv_freq]),  # one angle per head dimension, as HF lays them out
            # rotate_half(x) * sin == roll(x, half) * [-sin, sin]: one op instead of slicing and concatenating.
            sin_sign=torch.cat([-torch.ones(half), torch.ones(half)]).to(inv_freq.device),
        )
        self.layers = torch.nn.ModuleList(_Layer(layer) for layer in decoder.layers)

    @classmethod
    def of(cls, model: torch.nn.Module) -> LeanLlama | None:
        """The lean forward of a causal LM or of a VLM's language model; None when the architecture is one
        this module does not reproduce exactly."""
        config = model.config.get_text_config()
        if config.model_type not in SUPPORTED:
            return None  # checked first: other architectures lay their modules out otherwise (GPT-2 has no .model)
        decoder = getattr(model.model, "language_model", model.model)
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        if (
            config.hidden_act != "silu"
            or rope.get("rope_type", "default") != "default"
            or (getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True))
            or getattr(config, "mlp_bias", False)
            or getattr(decoder.rotary_emb, "attention_scaling", 1.0) != 1.0
        ):
            return None
        return cls(decoder, model.lm_head, config)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # As Hugging Face's RMSNorm: normalise in float32, scale in the model's dtype.
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache,
        logits_to_keep: int = 0,
        float32_head: bool = False,
    ) -> torch.Tensor:
        """tokens, positions [n, q]; mask [n, 1, q, read_len] additive; cache: the runner's SlotKVCache with
        write_slots and read_len set; float32_head: the final norm and LM head in float32 (float32_head.py).
        Returns logits [n, q or logits_to_keep, vocab], in float32 with float32_head."""
        n, q = tokens.shape
        h = self.embed[tokens]
        dtype = h.dtype
        angles = (positions[..., None].float() * self.inv_freq)[:, None]  # [n, 1, q, head_dim]
        cos, sin = angles.cos().to(dtype), (angles.sin() * self.sin_sign).to(dtype)
        width, half, rotated = self.heads * self.head_dim, self.head_dim // 2, self.heads + self.kv_heads
        for index, layer in enumerate(self.layers):
            qkv = F.linear(self._norm(h, layer.input_norm), layer.qkv, layer.qkv_bias)
            qkv = qkv.view(n, q, -1, self.head_dim).transpose(1, 2)  # [n, heads + 2 kv_heads, q, head_dim]
            qk = qkv[:, :rotated]
            query, key = (qk * cos + qk.roll(half, -1) * sin).split([self.heads, self.kv_heads], 1)
            keys, values = cache.update(key, qkv[:, rotated:], index)
            attended = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=mask, enable_gqa=self.heads != self.kv_heads
            )
            h = h + F.linear(attended.transpose(1, 2).reshape(n, q, width), layer.out, layer.out_bias)
            gate, up = F.linear(self._norm(h, layer.post_norm), layer.gate_up).chunk(2, -1)
            h = h + F.linear(F.silu(gate) * up, layer.down)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        if float32_head:
            return float32_rms_logits(h, self.final_norm, self.eps, self.lm_head)
        return F.linear(self._norm(h, self.final_norm), self.lm_head)
