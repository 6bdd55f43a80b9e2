"""Drive a Hugging Face model through a SlotKVCache with explicit positions and attention masks.

The runner knows nothing about drafting or acceptance. It feeds `q` new tokens per row, writes their keys and
values at slots kv_len[row] + j, gives them the positions the caller asks for (consecutive for a chain, depth
for a tree), and lets each new token see the row's committed prefix plus whichever new tokens `attend` allows.
It never advances kv_len by itself: the caller commits what was accepted.
"""

from __future__ import annotations

import torch

from specvlm.specdec.cache import SlotKVCache


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


class ModelRunner:
    def __init__(self, model: torch.nn.Module, rows: int, capacity: int):
        self.model = model
        self.device = model.device
        self.dtype = model.dtype
        num_layers = model.config.get_text_config().num_hidden_layers
        self.cache = SlotKVCache(num_layers, rows, capacity)
        self.kv_len = torch.zeros(rows, dtype=torch.long, device=self.device)  # committed tokens per row

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,  # [n, q]
        attend: torch.Tensor,  # [n, q, q] bool: query j may see new token i
        depth: torch.Tensor | None = None,  # [n, q] position offset of each token; None = 0..q-1
        logits_to_keep: int = 0,  # 0 = logits for every query
        **model_inputs,  # pixel_values / image_sizes at prefill
    ) -> torch.Tensor:  # [n, q or logits_to_keep, vocab]
        n, q = tokens.shape
        kv_len = self.kv_len[:n]
        offsets = torch.arange(q, device=self.device)
        write_slots = kv_len[:, None] + offsets[None, :]  # [n, q]
        positions = kv_len[:, None] + (offsets[None, :] if depth is None else depth)
        read_len = int(kv_len.max()) + q
        if read_len > self.cache.capacity:
            raise RuntimeError(f"KV cache overflow: need {read_len} slots, have {self.cache.capacity}")

        # allowed[b, j, s]: query j of row b may attend to slot s.
        slots = torch.arange(read_len, device=self.device)
        allowed = (slots[None, :] < kv_len[:, None])[:, None, :].repeat(1, q, 1)  # committed prefix
        allowed.scatter_(2, write_slots[:, None, :].expand(n, q, q), attend)  # new tokens
        mask = torch.zeros(n, 1, q, read_len, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed[:, None], torch.finfo(self.dtype).min)

        self.cache.write_slots = write_slots
        self.cache.read_len = read_len
        out = self.model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
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
