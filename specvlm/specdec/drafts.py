"""Drafts: anything that proposes a continuation for each row. The verifier never knows which one it talks to.

A draft owns its shape: how deep it proposes (`max_depth`: a chain's length, a tree's depth), how many nodes a
proposal of a given depth holds, and the scratch it needs. The engine asks; each step it may ask for less than
the full depth (down to nothing, when speculation does not pay). The calls, in the spirit of Hugging Face's
candidate generators:
  allocate(rows, capacity)       room for the running batch (rows are reused as requests come and go)
  admit(rows, requests)          start drafting for these rows (a request may already carry generated tokens)
  release(rows)                  stop drafting for these rows; they propose nothing until admitted again
  propose(n, depth, ...)         every drafting step: up to `depth` tokens deep for each of rows [0, n)
  commit(step)                   every step: what the target committed per row (accepted prefix + one token)
  move_rows(dst, src)            follow the engine when it compacts its rows
Rows the draft has not admitted propose nothing, and whatever their scratch holds is never read.

A draft never reads the device inside a step: what it needs to know on the host (how many tokens each row
committed) comes with `commit`, from the one read the decoder makes per step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from specvlm.specdec.compiled import StepCompiler
from specvlm.specdec.lean_llama import LeanLlama
from specvlm.specdec.prefill import prefill
from specvlm.specdec.prefix_cache import PrefixCache
from specvlm.specdec.proposal import Proposal
from specvlm.specdec.requests import Request
from specvlm.specdec.runner import ModelRunner, causal_attend
from specvlm.specdec.sampling import RowRandom, SamplingParams, probs_from_logits, sample_from
from specvlm.specdec.shapes import EXACT, ShapeBuckets


@dataclass
class Commit:
    """What the target committed in one step for rows [0, n): per row its first counts[row] tokens (the accepted
    drafts, then the target's own token), on the device and, read back once, on the host."""

    tokens: torch.Tensor  # [n, m]
    counts: torch.Tensor  # [n]
    host_tokens: np.ndarray  # [n, m]
    host_counts: np.ndarray  # [n]


class Draft(ABC):
    name: str
    max_depth: int  # the deepest proposal: chain length, or tree depth
    cost_ratio: float = 0.0  # c: cost of one draft forward relative to one target forward

    def max_nodes(self, depth: int) -> int:
        """The most draft tokens a proposal of this depth holds (a chain: depth)."""
        return depth

    def calls(self, depth: int) -> int:
        """Draft forward passes a proposal of this depth takes."""
        return depth

    @abstractmethod
    def reset(self) -> None:
        """Forget every row: a new decoder starts with this draft."""

    def use(self, shapes: ShapeBuckets, compiler: StepCompiler | None, prefix_cache: PrefixCache | None = None) -> None:
        """The shapes and the compiler the decoder runs its forwards with, and where admission keeps the prefixes
        it shares between requests (prefix_cache.py; None: it shares none); drafts without a model ignore them."""
        return None

    @abstractmethod
    def allocate(self, rows: int, capacity: int) -> None:
        """Room for `rows` rows of up to `capacity` committed tokens each, keeping the rows already admitted."""

    @abstractmethod
    def admit(self, rows: list[int], requests: list[Request]) -> dict[int, str]:
        """Start drafting for rows[i] from requests[i].input_ids (prompt, and any tokens generated so far).
        Returns an error message for each request index the draft cannot serve; those rows stay released."""

    @abstractmethod
    def release(self, rows: list[int]) -> None:
        """Stop drafting for these rows."""

    @abstractmethod
    def propose(self, n: int, depth: int, params: SamplingParams, rng: RowRandom | None) -> Proposal:
        """Propose for rows [0, n), at most `depth` deep. rng drives sampling (None when greedy); each row draws
        the same number of uniforms whatever the other rows do."""

    @abstractmethod
    def commit(self, step: Commit) -> None:
        """What rows [0, n) committed this step."""

    @abstractmethod
    def move_rows(self, dst: list[int], src: list[int]) -> None: ...


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on the device without waiting for the device: from pageable memory a copy to a GPU waits
    for the work queued before it, from pinned memory it is queued like any other."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def strip_image_tokens(ids: list[int], image_token_id: int | None) -> list[int]:
    return [t for t in ids if t != image_token_id]


def append_tokens(buffer: torch.Tensor, length: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor) -> None:
    """buffer[row, length[row] + j] = tokens[row, j] for j < counts[row]; then length += counts."""
    n, m = tokens.shape
    cols = length[:n, None] + torch.arange(m, device=buffer.device)
    keep = torch.arange(m, device=buffer.device)[None, :] < counts[:, None]
    # Padding columns are written too (their own values back), into the scratch past each row's length: no
    # host sync in the decode loop. Every row's length leaves that room: live rows by the capacity's window,
    # released rows because release resets them.
    buffer[:n].scatter_(1, cols, torch.where(keep, tokens, buffer[:n].gather(1, cols)))
    length[:n] += counts


class ModelDraft(Draft):
    """A small causal LM (text-only draft: fed the prompt's text tokens, no image) or a small VLM (fed the
    same expanded prompt and pixels as the target), proposing a chain of up to `gamma` tokens.

    With min_confidence > 0 the chain adapts its length: a row stops drafting when the draft's next
    distribution has no token above that probability, and the batch stops when every row has. The decision is
    made before the token is drawn, from what the draft has already seen, so sampling stays exact.

    Decode steps run through LeanLlama where the architecture allows (lean=False keeps Hugging Face's forward):
    the draft is called up to gamma times a step, and at its size framework overhead is most of its cost.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        text_only: bool,
        image_token_id: int | None,
        target_vocab: int,
        cost_ratio: float,
        name: str,
        gamma: int = 5,
        min_confidence: float = 0.0,
        lean: bool = True,
    ):
        if gamma < 1:
            raise ValueError(f"gamma (draft depth) must be >= 1, got {gamma}")
        self.model = model
        # Built once per draft: it holds fused copies of the projection weights.
        self.lean = LeanLlama.of(model) if lean else None
        self.max_depth = gamma
        self.min_confidence = min_confidence
        self.text_only = text_only
        self.image_token_id = image_token_id
        self.target_vocab = target_vocab  # the target's logit width; draft logits are aligned to it
        self.cost_ratio = cost_ratio
        self.name = name
        self.device = model.device
        self.runner: ModelRunner | None = None
        self.fed_drafts = 0
        self.shapes, self.compiler, self.prefix_cache = EXACT, None, None

    def reset(self):
        self.runner = None

    def use(self, shapes, compiler, prefix_cache=None):
        self.shapes, self.compiler, self.prefix_cache = shapes, compiler, prefix_cache

    def scratch(self) -> int:
        """Cache slots needed past the committed tokens: a chain of max_depth after up to 2 pending tokens."""
        return self.max_depth + 2

    def allocate(self, rows, capacity):
        capacity += self.scratch()
        if self.runner is None:
            self.runner = ModelRunner(
                self.model, rows, capacity, lean=self.lean, shapes=self.shapes, compiler=self.compiler, role="draft"
            )
            self.tokens = torch.zeros(rows, capacity, dtype=torch.long, device=self.device)
            self.length = torch.zeros(rows, dtype=torch.long, device=self.device)
            self.active = torch.zeros(rows, dtype=torch.bool, device=self.device)
            self.host_length = np.zeros(rows, dtype=np.int64)  # `length` and `active`, on the host
            self.host_active = np.zeros(rows, dtype=bool)
            return
        self.runner.resize(rows, capacity)
        kept = min(rows, len(self.length))
        tokens = torch.zeros(rows, capacity, dtype=torch.long, device=self.device)
        width = min(capacity, self.tokens.shape[1])
        tokens[:kept, :width] = self.tokens[:kept, :width]
        self.tokens = tokens
        self.length = torch.cat([self.length[:kept], self.length.new_zeros(rows - kept)])
        self.active = torch.cat([self.active[:kept], self.active.new_zeros(rows - kept)])
        self.host_length = np.concatenate([self.host_length[:kept], np.zeros(rows - kept, dtype=np.int64)])
        self.host_active = np.concatenate([self.host_active[:kept], np.zeros(rows - kept, dtype=bool)])

    def _view(self, request: Request) -> list[int]:
        ids = request.input_ids
        return strip_image_tokens(ids, self.image_token_id) if self.text_only else ids

    def admit(self, rows, requests):
        prompts = [self._view(r) for r in requests]
        scratch, good, errors = prefill(
            self.model,
            requests,
            prompts,
            max(map(len, prompts)),
            use_images=not self.text_only,
            lean=self.lean,
            share=self.prefix_cache is not None,
            like=self.runner,
            cache=self.prefix_cache,
        )
        if good:
            taken = [rows[i] for i in good]
            self.runner.take_rows(taken, scratch)
            for i in good:
                self.tokens[rows[i], : len(prompts[i])] = torch.tensor(prompts[i], device=self.device)
            lengths = [len(prompts[i]) for i in good]
            index = torch.tensor(taken, device=self.device)
            self.length[index] = torch.tensor(lengths, device=self.device)
            self.active[index] = True
            self.host_length[taken] = lengths
            self.host_active[taken] = True
        return {i: f"draft {self.name}: {e}" for i, e in errors.items()}

    def release(self, rows):
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.active[index] = False
        self.length[index] = 0
        self.host_active[rows] = False
        self.host_length[rows] = 0
        self.runner.release(rows)

    def _feed_pending(self, n: int) -> torch.Tensor:
        """Feed the committed tokens the draft's cache lacks; return the draft's logits after them [n, V]."""
        runner = self.runner
        # 1 token, or 2 when the last chain was fully accepted; up to depth + 1 after a tree; more after steps
        # the engine took without drafting. Released rows feed nothing.
        pending = torch.where(self.active[:n], self.length[:n] - runner.kv_len[:n], 0)  # [n]
        host_pending = np.where(self.host_active[:n], self.host_length[:n] - runner.kv_host[:n], 0)
        width = max(1, int(host_pending.max()))
        cols = (runner.kv_len[:n, None] + torch.arange(width, device=self.device)).clamp(max=self.tokens.shape[1] - 1)
        feed = self.tokens[:n].gather(1, cols)  # [n, width]; past a row's pending count it is scratch
        logits = runner.forward(feed, causal_attend(pending.clamp(min=1), width))
        runner.advance(n, pending, host_pending)
        return self._align_vocab(logits[torch.arange(n, device=self.device), (pending - 1).clamp(min=0)])

    def propose(self, n, depth, params, rng):
        runner = self.runner
        uniforms = rng.uniforms(n, self.max_depth) if rng is not None else None
        last = self._feed_pending(n)
        lengths = torch.where(self.active[:n], depth, 0)
        one = torch.ones(n, dtype=torch.long, device=self.device)
        tokens, probs = [], []
        for i in range(depth):
            if params.greedy:
                p = last.softmax(-1) if self.min_confidence > 0 else None  # only the stopping rule needs it
                tokens.append(last.argmax(-1))
            else:
                p = probs_from_logits(last, params)
                tokens.append(sample_from(p, uniforms[:, i]))
                probs.append(p)
            if i > 0 and self.min_confidence > 0:
                # Decided from p, which the draft computed before drawing token i: sampling stays exact. Rows
                # that stopped keep being fed (a whole batch stopping early would have to be read back).
                unsure = p.max(-1).values < self.min_confidence
                lengths = torch.where(unsure & (lengths > i), i, lengths)
            if i == depth - 1:
                break  # the last proposal is never fed: nothing would use its logits
            step = runner.forward(tokens[-1][:, None], causal_attend(one, 1))
            last = self._align_vocab(step[:, -1])
            runner.advance(n, one, 1)
        self.fed_drafts = depth - 1
        return Proposal.chain(
            torch.stack(tokens, 1),
            lengths.clamp(max=len(tokens)),
            torch.stack(probs, 1) if probs else None,
            draft_calls=depth,
        )

    def _align_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft and target may pad their embedding tables differently; verification needs one vocabulary."""
        width = logits.shape[-1]
        if width > self.target_vocab:
            return logits[..., : self.target_vocab]
        if width < self.target_vocab:
            return torch.nn.functional.pad(logits, (0, self.target_vocab - width), value=float("-inf"))
        return logits

    def commit(self, step):
        n = step.counts.shape[0]
        if self.fed_drafts == 0 and not self.host_active[:n].any():
            return  # it holds no row and fed nothing: nothing to keep up to date
        # Drafts fed into the cache stay valid up to the first rejected one; released rows keep none.
        kept = torch.where(self.active[:n], (step.counts - 1).clamp(min=0, max=self.fed_drafts), 0)
        host_kept = np.where(self.host_active[:n], np.clip(step.host_counts - 1, 0, self.fed_drafts), 0)
        self.runner.advance(n, kept - self.fed_drafts, host_kept - self.fed_drafts)
        self.fed_drafts = 0
        append_tokens(self.tokens, self.length, step.tokens, torch.where(self.active[:n], step.counts, 0))
        self.host_length[:n] += np.where(self.host_active[:n], step.host_counts, 0)

    def move_rows(self, dst, src):
        self.runner.move_rows(dst, src)
        dst_t, src_t = torch.tensor(dst, device=self.device), torch.tensor(src, device=self.device)
        for state in (self.tokens, self.length, self.active):
            state[dst_t] = state[src_t]
        self.host_length[dst] = self.host_length[src]
        self.host_active[dst] = self.host_active[src]


class PromptLookupDraft(Draft):
    """Prompt lookup: find the latest earlier occurrence of the row's last n tokens (n from max_ngram down to
    min_ngram) in its own text and propose what followed it. No model, so no cost; good when outputs quote
    the prompt or repeat themselves."""

    name = "prompt_lookup"

    def __init__(
        self,
        *,
        image_token_id: int | None,
        device: torch.device,
        gamma: int = 5,
        max_ngram: int = 3,
        min_ngram: int = 1,
    ):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if gamma < 1:
            raise ValueError(f"gamma (draft depth) must be >= 1, got {gamma}")
        self.image_token_id = image_token_id
        self.device = device
        self.max_depth = gamma
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.history: list[np.ndarray | None] = []

    def reset(self):
        self.history = []

    def allocate(self, rows, capacity):
        # Histories live on the host: the search is a handful of small numpy scans per row.
        self.history = (self.history + [None] * rows)[:rows]

    def admit(self, rows, requests):
        for row, r in zip(rows, requests):
            self.history[row] = np.array(strip_image_tokens(r.input_ids, self.image_token_id), dtype=np.int64)
        return {}

    def release(self, rows):
        for row in rows:
            self.history[row] = None

    def _lookup(self, history: np.ndarray | None, depth: int) -> np.ndarray:
        if history is None:
            return np.zeros(0, dtype=np.int64)
        for size in range(min(self.max_ngram, len(history) - 1), self.min_ngram - 1, -1):
            suffix = history[-size:]
            windows = np.lib.stride_tricks.sliding_window_view(history[:-1], size)
            starts = np.flatnonzero((windows == suffix).all(axis=1))
            if len(starts):
                begin = starts[-1] + size
                return history[begin : begin + depth]
        return history[:0]

    def propose(self, n, depth, params, rng):
        found = [self._lookup(h, depth) for h in self.history[:n]]
        tokens = torch.zeros(n, depth, dtype=torch.long)
        for row, cont in enumerate(found):
            tokens[row, : len(cont)] = torch.from_numpy(cont)
        lengths = torch.tensor([len(c) for c in found])
        return Proposal.chain(to_device(tokens, self.device), to_device(lengths, self.device), None, draft_calls=0)

    def calls(self, depth):
        return 0

    def commit(self, step):
        for row, count in enumerate(step.host_counts.tolist()):
            if self.history[row] is not None:
                self.history[row] = np.concatenate([self.history[row], step.host_tokens[row, :count]])

    def move_rows(self, dst, src):
        for d, s in zip(dst, src):
            self.history[d] = self.history[s]
