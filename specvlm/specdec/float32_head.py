"""The target's final norm and LM head in float32 (DecodeConfig.float32_head).

Why: in bf16 the logits of a verification window and of a one-token pass come from hidden states that differ by
rounding (other matrix shapes, other kernels). Where the top two logits are closer than that, the two passes pick
different tokens. Two roundings sit right before the argmax: the normed last hidden states and the logits
themselves are rounded to bf16 (a step of 1/16 at a logit of 10, wider than most near-ties). Computing the norm
and the head in float32 from the decoder's bf16 output removes those two; what is left is the hidden states'
own rounding.

Hugging Face's forward applies the final norm inside the decoder and returns only normed states, so this runs
the decoder with its norm left out (a view sharing every other module and weight) and then the model's own norm
module on float32 states: its arithmetic (weight or 1 + weight, epsilon) stays the model's, in float32.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F


class Float32Head:
    """A causal LM's decoder without its final norm, and that norm and the LM head in float32 on its output."""

    def __init__(self, model: torch.nn.Module):
        text = model.config.get_text_config()
        for name in ("final_logit_softcapping", "logit_scale"):
            if getattr(text, name, None):
                raise ValueError(
                    f"decode.float32_head: the {text.model_type} target transforms its logits ({name}), which the "
                    "float32 head does not reproduce; set decode.float32_head: false"
                )
        head = model.get_output_embeddings()
        decoder = model.get_decoder()
        norm = getattr(decoder, "norm", None)
        if not isinstance(head, torch.nn.Linear) or head.bias is not None or norm is None:
            raise ValueError(
                f"decode.float32_head: {type(model).__name__} has no plain final norm and linear LM head to run in "
                "float32; set decode.float32_head: false"
            )
        self.norm = norm
        self.weight = head.weight  # [vocab, width]
        self.decoder = copy.copy(decoder)
        self.decoder._modules = {**decoder._modules, "norm": torch.nn.Identity()}

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [n, q, vocab] in float32 from the decoder's unnormed last hidden states [n, q, width]."""
        return F.linear(self.norm(hidden.float()), self.weight.float())


def float32_rms_logits(
    hidden: torch.Tensor, norm_weight: torch.Tensor, eps: float, head_weight: torch.Tensor
) -> torch.Tensor:
    """The same for a Llama-family RMSNorm given by its weight (the lean forward's): logits [n, q, vocab] in float32
    from hidden states [n, q, width] of any dtype."""
    normed = F.rms_norm(hidden.float(), (hidden.shape[-1],), eps=eps) * norm_weight.float()
    return F.linear(normed, head_weight.float())
