"""Drafts: anything that proposes a continuation for each row. The verifier never knows which one it talks to.

The interface is three calls per batch, in the spirit of Hugging Face's candidate generators:
  prefill(requests)         once, with the batch's prompts
  propose(gamma, ...)       every step: up to gamma tokens per row (rows may propose fewer)
  commit(tokens, counts)    every step: what the target committed per row (accepted prefix + one target token)
plus move_rows, to follow the engine when finished rows are compacted away.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from specvlm.specdec.lean_llama import LeanLlama
from specvlm.specdec.proposal import Proposal
from specvlm.specdec.requests import Request, collate_images
from specvlm.specdec.runner import ModelRunner, causal_attend
from specvlm.specdec.sampling import RowRandom, SamplingParams, probs_from_logits, sample_from


class Draft(ABC):
    name: str
    cost_ratio: float = 0.0  # c: cost of one draft forward relative to one target forward

    @abstractmethod
    def prefill(self, requests: list[Request], max_new_tokens: int, gamma: int) -> None:
        """Start a batch of requests that will generate up to max_new_tokens each."""

    def max_nodes(self, gamma: int) -> int:
        """The most draft tokens one proposal can hold (a chain: gamma)."""
        return gamma

    @abstractmethod
    def propose(self, n: int, gamma: int, params: SamplingParams, rng: RowRandom | None) -> Proposal:
        """Propose for the first n rows, at most gamma tokens deep. rng drives sampling (None when greedy);
        a row must draw the same number of uniforms whatever the other rows do."""

    @abstractmethod
    def commit(self, tokens: torch.Tensor, counts: torch.Tensor) -> None:
        """tokens [n, m]: per row the first counts[row] are now committed (accepted drafts + target token)."""

    @abstractmethod
    def move_rows(self, dst: list[int], src: list[int]) -> None: ...


def strip_image_tokens(ids: list[int], image_token_id: int | None) -> list[int]:
    return [t for t in ids if t != image_token_id]


class ModelDraft(Draft):
    """A small causal LM (text-only draft: fed the prompt's text tokens, no image) or a small VLM (fed the
    same expanded prompt and pixels as the target), proposing a chain.

    With min_confidence > 0 the chain adapts its length: a row stops drafting when the draft's next
    distribution has no token above that probability, and the batch stops when every row has. The decision is
    made before the token is drawn, from what the draft has already seen, so sampling stays exact.

    Decode steps run through LeanLlama where the architecture allows (lean=False keeps Hugging Face's forward):
    the draft is called gamma times a step, and at its size framework overhead is most of its cost.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        text_only: bool,
        image_token_id: int | None,
        vocab_size: int,
        cost_ratio: float,
        name: str,
        min_confidence: float = 0.0,
        lean: bool = True,
    ):
        self.model = model
        # Built once per draft: it holds fused copies of the projection weights.
        self.lean = LeanLlama.of(model) if lean else None
        self.min_confidence = min_confidence
        self.text_only = text_only
        self.image_token_id = image_token_id
        self.vocab_size = vocab_size  # the target's logit width; draft logits are aligned to it
        self.cost_ratio = cost_ratio
        self.name = name
        self.device = model.device

    def scratch(self, gamma: int) -> int:
        """Cache slots needed past the committed tokens: a chain of gamma after up to 2 pending tokens."""
        return gamma + 2

    def prefill(self, requests: list[Request], max_new_tokens: int, gamma: int) -> None:
        prompts = [
            strip_image_tokens(r.input_ids, self.image_token_id) if self.text_only else r.input_ids for r in requests
        ]
        n, longest = len(prompts), max(len(p) for p in prompts)
        capacity = longest + max_new_tokens + self.scratch(gamma)
        self.tokens = torch.zeros(n, capacity, dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):
            self.tokens[row, : len(prompt)] = torch.tensor(prompt)
        self.length = torch.tensor([len(p) for p in prompts], device=self.device)
        self.runner = ModelRunner(self.model, n, capacity, lean=self.lean)
        # Like the target, the draft caches all but the last prompt token; that one is fed by the first proposal.
        images = {} if self.text_only else collate_images(requests, self.model)
        self.runner.prefill(self.tokens[:, : longest - 1], self.length - 1, **images)
        self.fed_drafts = 0

    def _feed_pending(self, n: int) -> torch.Tensor:
        """Feed the committed tokens the draft's cache lacks; return the draft's logits after them [n, V]."""
        runner = self.runner
        # 1 token, or 2 when the last chain was fully accepted; up to depth + 1 after a tree.
        pending = self.length[:n] - runner.kv_len[:n]  # [n]
        width = int(pending.max())
        cols = runner.kv_len[:n, None] + torch.arange(width, device=self.device)
        feed = self.tokens[:n].gather(1, cols)  # [n, width]; past a row's pending count it is scratch
        logits = runner.forward(feed, causal_attend(pending, width))
        runner.kv_len[:n] += pending
        return self._align_vocab(logits[torch.arange(n, device=self.device), pending - 1])

    def propose(self, n, gamma, params, rng):
        runner = self.runner
        uniforms = rng.uniforms(n, gamma) if rng is not None else None
        last = self._feed_pending(n)
        lengths = torch.full((n,), gamma, device=self.device)
        tokens, probs, calls = [], [], 1
        for i in range(gamma):
            if params.greedy:
                p = last.softmax(-1) if self.min_confidence > 0 else None  # only the stopping rule needs it
                tokens.append(last.argmax(-1))
            else:
                p = probs_from_logits(last, params)
                tokens.append(sample_from(p, uniforms[:, i]))
                probs.append(p)
            if i > 0 and self.min_confidence > 0:
                # Decided from p, which the draft computed before drawing token i: sampling stays exact.
                unsure = p.max(-1).values < self.min_confidence
                lengths = torch.where(unsure & (lengths > i), i, lengths)
            if i == gamma - 1 or not bool((lengths > i + 1).any()):
                break  # the last proposal is never fed: nothing would use its logits
            last = self._align_vocab(
                runner.forward(tokens[-1][:, None], causal_attend(torch.ones_like(lengths), 1))[:, -1]
            )
            runner.kv_len[:n] += 1
            calls += 1
        self.fed_drafts = calls - 1
        return Proposal.chain(
            torch.stack(tokens, 1),
            lengths.clamp(max=len(tokens)),
            torch.stack(probs, 1) if probs else None,
            draft_calls=calls,
        )

    def _align_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft and target may pad their embedding tables differently; verification needs one vocabulary."""
        width = logits.shape[-1]
        if width > self.vocab_size:
            return logits[..., : self.vocab_size]
        if width < self.vocab_size:
            return torch.nn.functional.pad(logits, (0, self.vocab_size - width), value=float("-inf"))
        return logits

    def commit(self, tokens, counts):
        n = counts.shape[0]
        # Drafts fed into the cache stay valid up to the first rejected one.
        accepted = counts - 1
        self.runner.kv_len[:n] -= self.fed_drafts - accepted.clamp(max=self.fed_drafts)
        append_tokens(self.tokens, self.length, tokens, counts)

    def move_rows(self, dst, src):
        dst_t, src_t = torch.tensor(dst, device=self.device), torch.tensor(src, device=self.device)
        self.runner.move_rows(dst_t, src_t)
        self.tokens[dst_t] = self.tokens[src_t]
        self.length[dst_t] = self.length[src_t]


def append_tokens(buffer: torch.Tensor, length: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor) -> None:
    """buffer[row, length[row] + j] = tokens[row, j] for j < counts[row]; then length += counts."""
    n, m = tokens.shape
    cols = length[:n, None] + torch.arange(m, device=buffer.device)
    keep = torch.arange(m, device=buffer.device)[None, :] < counts[:, None]
    # Padding columns are written too, into scratch beyond the row's new length.
    buffer[:n].scatter_(1, cols, torch.where(keep, tokens, buffer[:n].gather(1, cols)))
    length[:n] += counts


class PromptLookupDraft(Draft):
    """Prompt lookup: find the latest earlier occurrence of the row's last n tokens (n from max_ngram down to
    min_ngram) in its own text and propose what followed it. No model, so no cost; good when outputs quote
    the prompt or repeat themselves."""

    name = "prompt_lookup"

    def __init__(self, *, image_token_id: int | None, device: torch.device, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.image_token_id = image_token_id
        self.device = device
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def prefill(self, requests, max_new_tokens, gamma):
        # Histories live on the host: the search is a handful of small numpy scans per row.
        self.history = [
            np.array(strip_image_tokens(r.input_ids, self.image_token_id), dtype=np.int64) for r in requests
        ]

    def _lookup(self, history: np.ndarray, gamma: int) -> np.ndarray:
        for size in range(min(self.max_ngram, len(history) - 1), self.min_ngram - 1, -1):
            suffix = history[-size:]
            windows = np.lib.stride_tricks.sliding_window_view(history[:-1], size)
            starts = np.flatnonzero((windows == suffix).all(axis=1))
            if len(starts):
                begin = starts[-1] + size
                return history[begin : begin + gamma]
        return history[:0]

    def propose(self, n, gamma, params, rng):
        found = [self._lookup(h, gamma) for h in self.history[:n]]
        tokens = torch.zeros(n, gamma, dtype=torch.long)
        for row, cont in enumerate(found):
            tokens[row, : len(cont)] = torch.from_numpy(cont)
        lengths = torch.tensor([len(c) for c in found])
        return Proposal.chain(tokens.to(self.device), lengths.to(self.device), probs=None, draft_calls=0)

    def commit(self, tokens, counts):
        tokens, counts = tokens.cpu().numpy(), counts.cpu().tolist()
        for row, count in enumerate(counts):
            self.history[row] = np.concatenate([self.history[row], tokens[row, :count]])

    def move_rows(self, dst, src):
        for d, s in zip(dst, src):
            self.history[d] = self.history[s]
