"""Drive a Hugging Face model through a SlotKVCache with explicit positions and attention masks.

The runner knows nothing about drafting or acceptance. Each row has a committed prefix (slots [0, kv_len)) that
every new token sees, followed by a *window* of uncommitted slots [kv_len, kv_len + W). A forward writes its q
tokens at chosen window offsets, gives them the positions the caller asks for (consecutive for a chain, depth
for a tree), and lets each one see the window slots that `attend` allows: a causal pattern for a chain, its
ancestors for a tree node (which may have been written by an earlier forward, as when a draft grows a tree
level by level). The runner never advances kv_len by itself: the caller commits what was accepted.

The masks are the whole attention pattern (Hugging Face applies a 4-D mask as given), so every attention rule
the model has must be in them: a sliding window is, per layer type; anything else is refused at construction.
"""

from __future__ import annotations

import functools
import inspect

import torch

from specvlm.specdec.cache import SlotKVCache
from specvlm.specdec.lean_llama import LeanLlama


class UnsupportedModel(ValueError):
    """The model has an attention rule the runner's masks do not reproduce."""


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


@functools.cache
def _takes_mask_per_layer_type(model_class: type) -> bool:
    # Models with layers of several attention kinds (Qwen2's max_window_layers) accept a dict of masks, one per
    # layer type; their source says so where it tests `isinstance(..., dict)` on the mask.
    return "causal_mask_mapping" in inspect.getsource(model_class.forward)


def attention_windows(model: torch.nn.Module) -> dict[str, int | None]:
    """Layer type -> sliding window (None: full attention), as the model's forward would apply it."""
    text = model.config.get_text_config()
    for name in ("attention_chunk_size", "alibi", "use_bidirectional_attention"):
        if getattr(text, name, None):
            raise UnsupportedModel(
                f"{text.model_type} target uses {name}={getattr(text, name)!r}, an attention rule this engine's "
                "masks do not reproduce; its output would differ from the model's own decoding"
            )
    window = getattr(text, "sliding_window", None)
    if window is not None and not getattr(text, "use_sliding_window", True):
        window = None
    types = set(getattr(text, "layer_types", None) or ["sliding_attention" if window else "full_attention"])
    unknown = types - {"full_attention", "sliding_attention"}
    if unknown:
        raise UnsupportedModel(
            f"{text.model_type} target has layer types {sorted(unknown)} whose attention this engine does not reproduce"
        )
    return {t: (window if t == "sliding_attention" else None) for t in types}


class ModelRunner:
    def __init__(self, model: torch.nn.Module, rows: int, capacity: int, lean: LeanLlama | None = None):
        """lean: the model's LeanLlama, to run text-only forwards through (drafts only: the
        target's Hugging Face forward is the reference for losslessness)."""
        self.model = model
        self.lean = lean
        self.cache_kwarg = _cache_kwarg(type(model))
        self.device = model.device
        self.dtype = model.dtype
        self.windows = attention_windows(model)
        if len(self.windows) > 1 and not _takes_mask_per_layer_type(type(model.get_decoder())):
            raise UnsupportedModel(
                f"{type(model).__name__} mixes sliding-window and full-attention layers but takes one mask for all"
            )
        num_layers = model.config.get_text_config().num_hidden_layers
        self.cache = SlotKVCache(num_layers, rows, capacity)
        self.kv_len = torch.zeros(rows, dtype=torch.long, device=self.device)  # committed tokens per row

    @property
    def rows(self) -> int:
        return self.cache.rows

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:  # [n, q, read_len] bool -> additive [n, 1, q, read_len]
        mask = torch.zeros(allowed.shape[0], 1, *allowed.shape[1:], dtype=self.dtype, device=self.device)
        return mask.masked_fill_(~allowed[:, None], torch.finfo(self.dtype).min)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,  # [n, q]
        attend: torch.Tensor,  # [n, q, W] bool: query j may see window slot w
        offsets: torch.Tensor | None = None,  # [n, q] window slot each token is written to; None = 0..q-1
        depth: torch.Tensor | None = None,  # [n, q] position of each token past kv_len; None = its offset
        logits_to_keep: int = 0,  # 0 = logits for every query
        inputs_embeds: torch.Tensor | None = None,  # [n, q, hidden] instead of the tokens' embeddings (images)
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
        masks = {}
        for layer_type, size in self.windows.items():
            if size is not None:
                # A sliding window shows keys at positions > p - size. Slot s holds position s, except tree nodes,
                # which sit at or beyond their position, all within one tree's depth of the root: a window longer
                # than a tree shows every one of them either way.
                masks[layer_type] = self._mask(allowed & (slots[None, None, :] > positions[:, :, None] - size))
            else:
                masks[layer_type] = self._mask(allowed)
        mask = masks if len(masks) > 1 else next(iter(masks.values()))

        self.cache.write_slots = write_slots
        self.cache.read_len = read_len
        if self.lean is not None and inputs_embeds is None:
            return self.lean(tokens, positions, mask, self.cache, logits_to_keep)
        inputs = {"input_ids": tokens} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
        out = self.model(
            **inputs,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{self.cache_kwarg: self.cache},
        )
        return out.logits

    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, inputs_embeds: torch.Tensor | None = None) -> None:
        """Fill the cache with each row's first lengths[row] tokens (right-padded [n, L]) and commit them."""
        n, width = tokens.shape
        self.kv_len[:n] = 0
        if width > 0:
            # Only the cache matters here; keep one logit so the LM head costs nothing.
            self.forward(tokens, causal_attend(lengths, width), logits_to_keep=1, inputs_embeds=inputs_embeds)
        self.kv_len[:n] = lengths

    def resize(self, rows: int, capacity: int) -> None:
        self.cache.resize(rows, capacity)
        kv_len = torch.zeros(rows, dtype=torch.long, device=self.device)
        kept = min(rows, len(self.kv_len))
        kv_len[:kept] = self.kv_len[:kept]
        self.kv_len = kv_len

    def take_rows(self, rows: torch.Tensor, source: ModelRunner) -> None:
        """Rows `rows` take over source's rows [0, len(rows)): their committed cache entries and lengths."""
        m = len(rows)
        self.cache.take_rows(rows, source.cache, int(source.kv_len[:m].max()))
        self.kv_len[rows] = source.kv_len[:m]

    def move_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.cache.move_rows(dst, src)
        self.kv_len[dst] = self.kv_len[src]

    def compact_window(self, n: int, src: torch.Tensor) -> None:
        """Per row, move window slots src [n, a] to the window's first a slots (an accepted tree path)."""
        start = self.kv_len[:n, None]
        self.cache.move_slots(n, start + src, start + torch.arange(src.shape[1], device=self.device))
