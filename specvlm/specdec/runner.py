"""Drive a Hugging Face model through a SlotKVCache with explicit positions and attention masks.

The runner knows nothing about drafting or acceptance. Each row has a committed prefix (slots [0, kv_len)) that
every new token sees, followed by a *window* of uncommitted slots [kv_len, kv_len + W). A forward writes its q
tokens at chosen window offsets, gives them the positions the caller asks for (consecutive for a chain, depth
for a tree), and lets each one see the window slots that `attend` allows: a causal pattern for a chain, its
ancestors for a tree node (which may have been written by an earlier forward, as when a draft grows a tree
level by level). The runner never advances kv_len by itself: the caller commits what was accepted.

The masks are the whole attention pattern (Hugging Face applies a 4-D mask as given), so every attention rule
the model has must be in them: a sliding window is, per layer type; anything else is refused at construction.

Nothing here reads the device. Committed lengths live twice: `kv_len` on the device, where masks, positions
and write slots are computed from it, and `kv_host` on the host, where the read length (a shape) is chosen; the
caller advances both from what it already knows. The part of a forward that runs on the device (masks, then the
model) is one function of tensors, `decode_forward`, which `compiled.py` can compile and a CUDA graph capture.
"""

from __future__ import annotations

import functools
import inspect

import numpy as np
import torch

from specvlm.specdec.cache import SlotKVCache
from specvlm.specdec.compiled import StepCompiler
from specvlm.specdec.float32_head import Float32Head
from specvlm.specdec.lean_llama import LeanLlama
from specvlm.specdec.rotary import RequestRotary, engaged
from specvlm.specdec.shapes import EXACT, ShapeBuckets


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


def _additive(model: torch.nn.Module) -> bool:
    """Whether the model's attention adds the mask to its scores (a float mask) rather than selecting with it.
    SDPA and FlexAttention take a boolean mask as is, which is cheaper to build; the eager path adds it."""
    implementation = getattr(model.config.get_text_config(), "_attn_implementation", None) or "eager"
    return implementation == "eager"


class DecodeForward:
    """The device half of a forward: masks from committed lengths, then the model. Only tensors go in, so that
    compiling it (compiled.py) specialises on nothing that changes from step to step.

    Inputs, for nb rows of qb queries each, reading R slots:
        tokens, positions, write_slots [nb, qb]; kv_len [nb]; attend [nb, qb, W]; valid [nb, qb] (real queries);
        read_slots [R] (0..R-1: its length is the read length); keys, values: the cache's per-layer buffers.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        lean: LeanLlama | None,
        windows: dict[str, int | None],
        float32_head: bool = False,
    ):
        """float32_head: the final norm and LM head in float32, logits in float32 (DecodeConfig.float32_head)."""
        self.model = model
        self.lean = lean
        self.windows = windows
        self.float32_head = float32_head
        self.head = Float32Head(model) if float32_head else None
        self.additive = _additive(model)
        # The decoder alone (float32 head) may name its cache argument otherwise than the whole model.
        self.cache_kwarg = _cache_kwarg(type(model if self.head is None else self.head.decoder))
        self.dtype = model.dtype

    def masks(self, kv_len, attend, valid, positions, read_slots):
        """[nb, 1, qb, R] per layer type: the committed prefix, the window slots `attend` allows; a padded query
        sees slot 0 only."""
        window = attend.shape[2]
        rel = read_slots[None, None, :] - kv_len[:, None, None]  # [nb, 1, R]: slot's offset into the window
        in_window = (rel >= 0) & (rel < window)
        pattern = attend.gather(2, rel.clamp(0, window - 1).expand(-1, attend.shape[1], -1))  # [nb, qb, R]
        allowed = (rel < 0) | (in_window & pattern)
        allowed = torch.where(valid[:, :, None], allowed, read_slots[None, None, :] == 0)
        masks = {}
        for layer_type, size in self.windows.items():
            keep = allowed
            if size is not None:
                # A sliding window shows keys at positions > p - size. Slot s holds position s, except tree nodes,
                # which sit at or beyond their position, all within one tree's depth of the root: a window longer
                # than a tree shows every one of them either way.
                keep = allowed & (read_slots[None, None, :] > positions[:, :, None] - size)
            keep = keep[:, None]
            if self.additive:
                keep = torch.zeros(keep.shape, dtype=self.dtype, device=keep.device).masked_fill_(
                    ~keep, torch.finfo(self.dtype).min
                )
            masks[layer_type] = keep
        return masks if len(masks) > 1 else next(iter(masks.values()))

    def __call__(
        self,
        tokens,
        positions,
        write_slots,
        kv_len,
        attend,
        valid,
        read_slots,
        keys,
        values,
        logits_to_keep: int = 0,
        inputs_embeds=None,
        cache: SlotKVCache | None = None,
    ):
        """cache: the runner's own, for a forward that may allocate its buffers (eager only); else a view of
        keys and values is made here, so that a compiled forward takes nothing but tensors."""
        mask = self.masks(kv_len, attend, valid, positions, read_slots)
        cache = SlotKVCache.view(keys, values) if cache is None else cache
        cache.write_slots, cache.read_len = write_slots, read_slots.shape[0]
        if self.lean is not None and inputs_embeds is None:
            return self.lean(tokens, positions, mask, cache, logits_to_keep, self.float32_head)
        inputs = {"input_ids": tokens} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
        common = dict(attention_mask=mask, position_ids=positions, use_cache=True, **{self.cache_kwarg: cache})
        if self.head is None:
            return self.model(**inputs, logits_to_keep=logits_to_keep, **common).logits
        hidden = self.head.decoder(**inputs, **common).last_hidden_state  # [nb, qb, width], before the final norm
        return self.head(hidden[:, -logits_to_keep:])  # logits_to_keep 0 keeps every query


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        rows: int,
        capacity: int,
        lean: LeanLlama | None = None,
        *,
        shapes: ShapeBuckets = EXACT,
        compiler: StepCompiler | None = None,
        role: str = "target",
        float32_head: bool = False,
    ):
        """lean: the model's LeanLlama, to run text-only forwards through (drafts only: the target's Hugging Face
        forward is the reference for losslessness). capacity: slots per row the caller may use; the cache holds
        one more, the trash slot that padded queries write to (and a spare row). compiler: compiles decode
        forwards, and prompt forwards (`prefill`, `extend`) apart once the cache is allocated (see `scratch`)."""
        self.model = model
        self.device = model.device
        self.forms = dict(lean=lean, shapes=shapes, compiler=compiler, role=role, float32_head=float32_head)
        self.windows = attention_windows(model)
        if len(self.windows) > 1 and not _takes_mask_per_layer_type(type(model.get_decoder())):
            raise UnsupportedModel(
                f"{type(model).__name__} mixes sliding-window and full-attention layers but takes one mask for all"
            )
        text = model.config.get_text_config()
        self.max_positions = getattr(text, "max_position_embeddings", None) or 1 << 30
        self.rotary = RequestRotary.of(model)
        self.shapes = shapes
        self.eager = DecodeForward(model, lean, self.windows, float32_head)
        self.compiled = compiler.wrap(self.eager, role) if compiler is not None else None
        self.compiled_prompt = compiler.wrap(self.eager, role, prompt=True) if compiler is not None else None
        # One slot per row more than the caller's capacity, the trash slot padded queries write to; and one row
        # more than the caller's, so that a forward's rows are always fewer than the cache's (a compiled graph then
        # meets one case of slicing the cache, not "all rows" and "some rows" as two).
        self.cache = SlotKVCache(text.num_hidden_layers, rows + 1, capacity + 1)
        self.kv_len = torch.zeros(rows, dtype=torch.long, device=self.device)  # committed tokens per row
        self.kv_host = np.zeros(rows, dtype=np.int64)  # the same, on the host

    @property
    def rows(self) -> int:
        return self.cache.rows - 1

    @property
    def capacity(self) -> int:
        return self.cache.capacity - 1

    @property
    def trash_slot(self) -> int:
        return self.cache.capacity - 1

    # ---- committed lengths, on the device and the host together ------------------------------------------------

    def set_lengths(self, rows: list[int] | slice, lengths: torch.Tensor | int, host: np.ndarray | list[int] | int):
        """Rows `rows` (host indices) hold lengths (on the device) = host (the same, on the host)."""
        index = rows if isinstance(rows, slice) else torch.tensor(rows, dtype=torch.long, device=self.device)
        self.kv_len[index] = lengths
        self.kv_host[rows] = host

    def advance(self, n: int, counts: torch.Tensor, host: np.ndarray) -> None:
        """Rows [0, n) committed counts[row] more tokens (host: the same counts, already on the host)."""
        self.kv_len[:n] += counts
        self.kv_host[:n] += host

    # ---- forwards ------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,  # [n, q]
        attend: torch.Tensor,  # [n, q, W] bool: query j may see window slot w
        offsets: torch.Tensor | None = None,  # [n, q] window slot each token is written to; None = 0..q-1
        depth: torch.Tensor | None = None,  # [n, q] position of each token past kv_len; None = its offset
        logits_to_keep: int = 0,  # 0 = logits for every query
        inputs_embeds: torch.Tensor | None = None,  # [n, q, hidden] instead of the tokens' embeddings (images)
        prompt_lengths: torch.Tensor | None = None,  # [n] a prompt forward: each row's whole prompt length
    ) -> torch.Tensor:  # [n, q or logits_to_keep, vocab]
        n, q = tokens.shape
        window = attend.shape[2]
        need = int(self.kv_host[:n].max()) + window
        if need > self.capacity:
            raise RuntimeError(f"KV cache overflow: need {need} slots, have {self.capacity}")
        device = self.device
        if offsets is None:
            offsets = torch.arange(q, device=device).expand(n, q)
        prompt = prompt_lengths is not None
        # Prompt forwards run at their exact size: each admission brings its own prompt lengths.
        run, shapes, cache = (self.compiled_prompt, EXACT, None) if prompt else (self.compiled, self.shapes, None)
        if run is None or not self.cache.allocated:
            # The first forward allocates the cache, so it runs eagerly.
            run, cache = self.eager, self.cache
        rows, width = shapes.rows(n, self.rows), shapes.window(q)
        if run is self.compiled and rows == 1 and self.rows > 1:
            rows = 2  # batch 1 shares the graph of batches >= 2
        read_len = shapes.read_len(need, self.capacity)
        if (rows, width) != (n, q):
            tokens, attend, offsets, depth = _pad(tokens, attend, offsets, depth, rows, width)
        valid = torch.zeros(rows, width, dtype=torch.bool, device=device)
        valid[:n, :q] = True
        kv_len = self.kv_len[:rows]
        write_slots = torch.where(valid, kv_len[:, None] + offsets, self.trash_slot)
        # Padding never carries a position past the model's: rotary embeddings that rescale by a forward's
        # longest position must see what each real row alone would give them.
        positions = kv_len[:, None] + (offsets if depth is None else depth)
        positions = torch.where(valid, positions.clamp(max=self.max_positions - 1), 0)
        read_slots = torch.arange(read_len, device=device)
        if prompt_lengths is not None:
            prompt_lengths = torch.nn.functional.pad(prompt_lengths, (0, rows - n), value=1)
        # Rotary frequencies that depend on a forward's longest position are chosen per token (rotary.py).
        with engaged(self.rotary, prompt_lengths):
            logits = run(
                tokens,
                positions,
                write_slots,
                kv_len,
                attend,
                valid,
                read_slots,
                self.cache.keys,
                self.cache.values,
                logits_to_keep,
                inputs_embeds,
                cache,
            )
        return logits[:n] if logits_to_keep else logits[:n, :q]

    def prefill(self, tokens: torch.Tensor, lengths: list[int], inputs_embeds: torch.Tensor | None = None) -> None:
        """Fill the cache with each row's first lengths[row] tokens (right-padded [n, L]) and commit them."""
        self.set_lengths(slice(0, tokens.shape[0]), 0, 0)
        self.extend(tokens, lengths, inputs_embeds)

    def extend(self, tokens: torch.Tensor, lengths: list[int], inputs_embeds: torch.Tensor | None = None) -> None:
        """Rows [0, n) cache and commit their next lengths[row] tokens (right-padded [n, L]) after what they hold."""
        n, width = tokens.shape
        on_device = torch.tensor(lengths, dtype=torch.long, device=self.device)
        if width > 0:
            # Only the cache matters here; keep one logit so the LM head costs nothing. The prompt `generate` reads
            # in one forward is all a row holds after this, and the last token, which the first decoding step feeds.
            attend = causal_attend(on_device, width)
            whole = self.kv_len[:n] + on_device + 1
            self.forward(tokens, attend, logits_to_keep=1, inputs_embeds=inputs_embeds, prompt_lengths=whole)
        self.advance(n, on_device, np.asarray(lengths, dtype=np.int64))

    def scratch(self, rows: int, capacity: int) -> ModelRunner:
        """A runner of the same model and forms with its cache allocated already (where this one's is), so that
        its first forward (a prefill) may run compiled; its rows are then taken over by this one (take_rows)."""
        runner = ModelRunner(self.model, rows, capacity, **self.forms)
        runner.cache.allocate_like(self.cache)
        return runner

    def resize(self, rows: int, capacity: int) -> None:
        self.cache.resize(rows + 1, capacity + 1)
        kept = min(rows, len(self.kv_host))
        kv_len = torch.zeros(rows, dtype=torch.long, device=self.device)
        kv_len[:kept] = self.kv_len[:kept]
        self.kv_len = kv_len
        self.kv_host = np.concatenate([self.kv_host[:kept], np.zeros(rows - kept, dtype=np.int64)])

    def take_rows(self, rows: list[int], source: ModelRunner, source_rows: list[int] | None = None) -> None:
        """Rows `rows` take over source's rows `source_rows` (default [0, len(rows)); one may serve several rows):
        their committed cache entries and lengths."""
        src = list(range(len(rows))) if source_rows is None else source_rows
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        src_index = torch.tensor(src, dtype=torch.long, device=self.device)
        self.cache.take_rows(index, source.cache, int(source.kv_host[src].max()), src_index)
        self.set_lengths(rows, source.kv_len[src_index], source.kv_host[src])

    def move_rows(self, dst: list[int], src: list[int]) -> None:
        src_index = torch.tensor(src, dtype=torch.long, device=self.device)
        self.cache.move_rows(torch.tensor(dst, dtype=torch.long, device=self.device), src_index)
        self.set_lengths(dst, self.kv_len[src_index], self.kv_host[src])

    def release(self, rows: list[int]) -> None:
        """These rows hold nothing now."""
        self.set_lengths(rows, 0, 0)

    def compact_window(self, n: int, src: torch.Tensor) -> None:
        """Per row, move window slots src [n, a] to the window's first a slots (an accepted tree path)."""
        start = self.kv_len[:n, None]
        self.cache.move_slots(n, start + src, start + torch.arange(src.shape[1], device=self.device))


def _pad(tokens, attend, offsets, depth, rows: int, width: int):
    """Inputs of n rows and q queries padded to rows x width (see shapes.py: padding is computed, not used)."""
    n, q = tokens.shape
    grow = (0, width - q, 0, rows - n)
    tokens = torch.nn.functional.pad(tokens, grow)
    offsets = torch.nn.functional.pad(offsets, grow)
    depth = None if depth is None else torch.nn.functional.pad(depth, grow)
    attend = torch.nn.functional.pad(attend, (0, 0, 0, width - q, 0, rows - n))
    return tokens, attend, offsets, depth
