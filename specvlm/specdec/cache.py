"""A key/value cache addressed by explicit slots, so that rejecting draft tokens costs nothing.

Hugging Face decoder layers call `past_key_values.update(k, v, layer_idx)` and attend over whatever it returns.
This cache keeps one preallocated buffer per layer,

    keys[layer], values[layer]: [rows, kv_heads, capacity, head_dim]

and writes each new token at the slot the engine chose for it (`write_slots`, one per row and query token).
A row's committed prefix lives in slots [0, kv_len[row]); everything at or beyond kv_len is scratch that the
next forward overwrites. So rollback after a rejected draft is just "don't advance kv_len", and ragged rows
(each with its own length) never need padding tricks inside the cache: the attention mask, built by the
runner from kv_len, says which slots each query may see.

Rows are a dense prefix [0, n) of the buffer. When rows finish, `move_rows` copies the few surviving rows
from the tail into the holes, so the active batch stays a cheap view and no step copies the whole cache.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(self, num_layers: int, rows: int, capacity: int):
        self.num_layers = num_layers
        self.rows = rows
        self.capacity = capacity
        # Allocated lazily on the first update, from the key/value shapes the model actually produces;
        # that keeps the cache independent of how each architecture names its head sizes.
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        # Set by the runner before every forward.
        self.write_slots: torch.Tensor | None = None  # [n, q] slot of each query token
        self.read_len = 0  # attention reads slots [0, read_len)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store this forward's keys/values ([n, kv_heads, q, head_dim]) and return all readable ones."""
        n, heads, q, dim = key_states.shape
        if self.keys[layer_idx] is None:
            shape = (self.rows, heads, self.capacity, dim)
            self.keys[layer_idx] = key_states.new_zeros(shape)
            self.values[layer_idx] = value_states.new_zeros(shape)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        index = self.write_slots[:, None, :, None].expand(n, heads, q, dim)
        keys[:n].scatter_(2, index, key_states)
        values[:n].scatter_(2, index, value_states)
        return keys[:n, :, : self.read_len], values[:n, :, : self.read_len]

    def move_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy whole rows src -> dst (used to fill the holes left by finished rows)."""
        for buf in (*self.keys, *self.values):
            if buf is not None:
                buf[dst] = buf[src]

    def move_slots(self, n: int, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """Per row, copy slots src -> dst ([n, a] each). Reads all sources before writing, so ranges may overlap."""
        for buf in (*self.keys, *self.values):
            if buf is not None:
                heads, dim = buf.shape[1], buf.shape[3]
                src = src_slots[:, None, :, None].expand(n, heads, -1, dim)
                dst = dst_slots[:, None, :, None].expand(n, heads, -1, dim)
                buf[:n].scatter_(2, dst, buf[:n].gather(2, src))
