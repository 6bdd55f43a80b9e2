"""A key/value cache addressed by explicit slots, so that rejecting draft tokens costs nothing.

Hugging Face decoder layers call `cache.update(k, v, layer_idx)` and attend over whatever it returns. This
cache keeps one preallocated buffer per layer,

    keys[layer], values[layer]: [rows, kv_heads, capacity, head_dim]

and writes each new token at the slot the engine chose for it (`write_slots`, one per row and query token).
A row's committed prefix lives in slots [0, kv_len[row]); everything at or beyond kv_len is scratch that the
next forward overwrites. So rollback after a rejected draft is just "don't advance kv_len", and ragged rows
(each with its own length) never need padding tricks inside the cache: the attention mask, built by the
runner from kv_len, says which slots each query may see.

The write is one `index_put_` per buffer: in place in eager mode and under torch.compile alike (a `scatter_`
into a buffer the compiled graph does not own is functionalised into a copy of the whole buffer), and the
buffers keep fixed addresses, which is what lets a CUDA graph replay over them.

Forwards run over the dense prefix of rows [0, n), a cheap view. New requests are prefilled in a cache of
their own and copied into free rows (`take_rows`); when the batch shrinks, `move_rows` copies the few
surviving rows from the tail into the holes. No step copies the whole cache.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(self, num_layers: int, rows: int, capacity: int):
        self.num_layers = num_layers
        self.rows = rows
        self.capacity = capacity
        # Allocated lazily on the first write, from the key/value shapes the model actually produces;
        # that keeps the cache independent of how each architecture names its head sizes.
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        # Compiled forwards on a GPU replay CUDA graphs over these buffers: their addresses must not change.
        self.static_addresses = False
        # Set by the runner before every forward.
        self.write_slots: torch.Tensor | None = None  # [n, q] slot of each query token
        self.read_len = 0  # attention reads slots [0, read_len)

    @classmethod
    def view(cls, keys: list[torch.Tensor], values: list[torch.Tensor]) -> SlotKVCache:
        """A cache over buffers that exist already (a compiled forward builds one from its tensor inputs)."""
        cache = cls.__new__(cls)
        cache.num_layers, cache.keys, cache.values = len(keys), keys, values
        cache.rows, cache.capacity = keys[0].shape[0], keys[0].shape[2]
        cache.write_slots, cache.read_len, cache.static_addresses = None, 0, False
        return cache

    @property
    def allocated(self) -> bool:
        return all(buf is not None for buf in self.keys)

    def _new(self, like: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
        buf = like.new_zeros((self.rows, heads, self.capacity, dim))
        if self.static_addresses:
            torch._dynamo.mark_static_address(buf)
        return buf

    def _buffers(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is None:
            self.keys[layer] = self._new(like, like.shape[1], like.shape[3])
            self.values[layer] = self._new(like, like.shape[1], like.shape[3])
        return self.keys[layer], self.values[layer]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store this forward's keys/values ([n, kv_heads, q, head_dim]) and return all readable ones."""
        n, heads, q, _ = key_states.shape
        keys, values = self._buffers(layer_idx, key_states)
        device = key_states.device
        index = (
            torch.arange(n, device=device)[:, None, None].expand(n, heads, q),
            torch.arange(heads, device=device)[None, :, None].expand(n, heads, q),
            self.write_slots[:, None, :].expand(n, heads, q),
        )
        keys.index_put_(index, key_states)
        values.index_put_(index, value_states)
        return keys[:n, :, : self.read_len], values[:n, :, : self.read_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Part of the Hugging Face cache interface: models ask it to infer the positions and masks a caller leaves
        out, and some (OPT) ask whether they need it or not. The runner always passes both, and its rows are
        ragged, so no single length is right; the answer is never used."""
        return 0

    def _all(self):
        return [buf for buf in (*self.keys, *self.values) if buf is not None]

    def resize(self, rows: int, capacity: int) -> None:
        """Change the row count and slots per row, keeping what the surviving rows and slots hold."""
        r, c = min(rows, self.rows), min(capacity, self.capacity)
        self.rows, self.capacity = rows, capacity
        for store in (self.keys, self.values):
            for layer, buf in enumerate(store):
                if buf is not None:
                    new = self._new(buf, buf.shape[1], buf.shape[3])
                    new[:r, :, :c] = buf[:r, :, :c]
                    store[layer] = new

    def take_rows(self, rows: torch.Tensor, source: SlotKVCache, length: int, source_rows: torch.Tensor) -> None:
        """Copy the first `length` slots of source's rows `source_rows` into this cache's rows `rows`."""
        for store, other in ((self.keys, source.keys), (self.values, source.values)):
            for layer, buf in enumerate(other):
                if buf is None:
                    continue
                if store[layer] is None:
                    store[layer] = self._new(buf, buf.shape[1], buf.shape[3])
                store[layer][rows, :, :length] = buf[source_rows, :, :length]

    def move_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy whole rows src -> dst (used to fill the holes left by finished rows)."""
        for buf in self._all():
            buf[dst] = buf[src]

    def move_slots(self, n: int, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """Per row, copy slots src -> dst ([n, a] each). Reads all sources before writing, so ranges may overlap."""
        for buf in self._all():
            heads, dim = buf.shape[1], buf.shape[3]
            src = src_slots[:, None, :, None].expand(n, heads, -1, dim)
            dst = dst_slots[:, None, :, None].expand(n, heads, -1, dim)
            buf[:n].scatter_(2, dst, buf[:n].gather(2, src))
