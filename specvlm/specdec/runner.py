"""Drive a Hugging Face model through a SlotKVCache with explicit positions and attention masks.

The runner knows nothing about drafting or acceptance. Each row has a committed prefix (slots [0, kv_len)) that
every new token sees, followed by a *window* of uncommitted slots [kv_len, kv_len + W). A forward writes its q
tokens at chosen window offsets, gives them the positions the caller asks for (consecutive for a chain, depth
for a tree), and lets each one see the window slots that `attend` allows: a causal pattern for a chain, its
ancestors for a tree node (which may have been written by an earlier forward, as when a draft grows a tree
level by level). The runner never advances kv_len by itself: the caller commits what was accepted.
"""

from __future__ import annotations

import functools
import inspect

import torch

from specvlm.specdec.cache import SlotKVCache
from specvlm.specdec.lean_llama import LeanLlama


def causal_attend(q_lens: torch.Tensor, q: int) -> torch.Tensor:
    """[n, q, q] causal pattern for right-padded rows of q_lens tokens.

    Padding queries see themselves only, so no mask row is empty (an empty row would give NaN attention);
    their outputs and the slots they write are scratch that is never read as committed.
    """
    arange = torch.arange(q, device=q_lens.device)
    valid = arange[None, :] < q_lens[:, None]  # [n, q]
    causal = arange[None, :] <= arange[:, None]  # [q, q] query j sees new token i <= j
    attend = causal[None] & valid[:, None, :]
    return attend | torch.eye(q, dtype=torch.bool, device=q_lens.device)[None]


@functools.cache
def _cache_kwarg(model_class: type) -> str:
    # transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name warns, and goes in 5.40);
    # older 5.x releases know only the old name. Looked up once per class, not per batch.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


class ModelRunner:
    def __init__(self, model: torch.nn.Module, rows: int, capacity: int, lean: LeanLlama | None = None):
        """lean: the model's LeanLlama, to run text-only forwards through (drafts only: the
        target's Hugging Face forward is the reference for losslessness)."""
        self.model = model
        self.lean = lean
        self.cache_kwarg = _cache_kwarg(type(model))
        self.device = model.device
        self.dtype = model.dtype
        num_layers = model.config.get_text_config().num_hidden_layers
        self.cache = SlotKVCache(num_layers, rows, capacity)
        self.kv_len = torch.zeros(rows, dtype=torch.long, device=self.device)  # committed tokens per row

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,  # [n, q]
        attend: torch.Tensor,  # [n, q, W] bool: query j may see window slot w
        offsets: torch.Tensor | None = None,  # [n, q] window slot each token is written to; None = 0..q-1
        depth: torch.Tensor | None = None,  # [n, q] position of each token past kv_len; None = its offset
        logits_to_keep: int = 0,  # 0 = logits for every query
        **model_inputs,  # pixel_values / image_sizes at prefill
    ) -> torch.Tensor:  # [n, q or logits_to_keep, vocab]
        n, q = tokens.shape
        window = attend.shape[2]
        kv_len = self.kv_len[:n]
        if offsets is None:
            offsets = torch.arange(q, device=self.device).expand(n, q)
        write_slots = kv_len[:, None] + offsets  # [n, q]
        positions = kv_len[:, None] + (offsets if depth is None else depth)
        read_len = int(kv_len.max()) + window
        if read_len > self.cache.capacity:
            raise RuntimeError(f"KV cache overflow: need {read_len} slots, have {self.cache.capacity}")

        # allowed[b, j, s]: query j of row b may attend to slot s: the committed prefix, plus its window slots.
        slots = torch.arange(read_len, device=self.device)
        allowed = (slots[None, :] < kv_len[:, None])[:, None, :].repeat(1, q, 1)
        window_slots = kv_len[:, None] + torch.arange(window, device=self.device)  # [n, W]
        allowed.scatter_(2, window_slots[:, None, :].expand(n, q, window), attend)
        mask = torch.zeros(n, 1, q, read_len, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed[:, None], torch.finfo(self.dtype).min)

        self.cache.write_slots = write_slots
        self.cache.read_len = read_len
        if self.lean is not None and not model_inputs:
            return self.lean(tokens, positions, mask, self.cache, logits_to_keep)
        out = self.model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{self.cache_kwarg: self.cache},
            **model_inputs,
        )
        return out.logits

    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, **model_inputs) -> None:
        """Fill the cache with each row's first lengths[row] tokens (right-padded [n, L]) and commit them."""
        n, width = tokens.shape
        self.kv_len[:n] = 0
        if width > 0:
            # Only the cache matters here; keep one logit so the LM head costs nothing.
            self.forward(tokens, causal_attend(lengths, width), logits_to_keep=1, **model_inputs)
        self.kv_len[:n] = lengths

    def move_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.cache.move_rows(dst, src)
        self.kv_len[dst] = self.kv_len[src]

    def compact_window(self, n: int, src: torch.Tensor) -> None:
        """Per row, move window slots src [n, a] to the window's first a slots (an accepted tree path)."""
        start = self.kv_len[:n, None]
        self.cache.move_slots(n, start + src, start + torch.arange(src.shape[1], device=self.device))
