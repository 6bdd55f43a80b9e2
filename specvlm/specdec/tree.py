"""Dynamic tree drafting (Spec-LLaVA, EAGLE-2): grow the draft tree where the draft is confident.

Level by level, the `beam` nodes with the highest cumulative draft probability (the product of the draft's
probabilities along the path) are fed to the draft in one forward pass, with a tree mask so each sees only its
ancestors, and each gets `topk` children. The tree's shape therefore changes every step and differs per row.

Greedy decoding takes the top-k tokens as children and finally keeps the `max_nodes` best nodes (any subtree
verifies correctly under greedy acceptance). Sampling must keep the verifier exact, so children are drawn without
replacement from the draft distribution (Gumbel top-k) and nothing is pruned after it was drawn: which nodes get
children, and how many, is decided from what was drawn before them only.

After verification the draft does not keep its tree's cache entries: the accepted path and the target's token
are simply fed again, in the single forward that starts the next tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from specvlm.specdec.drafts import ModelDraft
from specvlm.specdec.proposal import Proposal
from specvlm.specdec.sampling import probs_from_logits


@dataclass(frozen=True)
class TreeSettings:
    __pydantic_config__: ClassVar[dict] = {"extra": "forbid"}  # unknown keys in a job config are errors

    # Defaults tuned on the demo family (docs/benchmarks.md, Trees): its drafts are confident, so narrow and
    # deep beats wide.
    topk: int = 2  # children per expanded node
    beam: int = 2  # nodes expanded per level
    max_nodes: int = 16  # nodes verified per row and step
    min_score: float = 0.0  # nodes whose path probability is below this are not expanded (greedy: not kept)

    def __post_init__(self):
        for name in ("topk", "beam", "max_nodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.min_score < 1.0:
            raise ValueError(f"min_score must be in [0, 1), got {self.min_score}")


class TreeDraft(ModelDraft):
    """A model draft proposing a dynamic tree of depth up to `gamma` (see the module docstring)."""

    def __init__(self, *args, tree: TreeSettings, **kwargs):
        super().__init__(*args, **kwargs)
        self.tree = tree

    def max_nodes(self, depth: int) -> int:
        t = self.tree
        return min(t.max_nodes, t.topk + (depth - 1) * t.beam * t.topk) if depth > 0 else 0

    def scratch(self) -> int:
        # Every node ever created has a window slot (greedy creates more than it keeps), after a pending
        # feed of up to max_depth + 1 tokens.
        t = self.tree
        return t.topk + (self.max_depth - 1) * t.beam * t.topk + self.max_depth + 1

    def propose(self, n, depth, params, rng):
        t = self.tree
        greedy = params.greedy
        root = self._feed_pending(n)
        self.fed_drafts = 0  # tree entries are never kept: see the module docstring
        dist = self._distribution(root, params)  # [n, V]
        tokens, probs = self._children(dist, t.topk, rng)  # [n, topk]
        parents = torch.full_like(tokens, -1)
        scores = probs
        ancestry = _identity(n, t.topk, tokens.device)  # [n, nodes, nodes], see Proposal
        node_dists = [dist[:, None].expand(-1, t.topk, -1)] if not greedy else []
        level, calls = slice(0, t.topk), 1

        for _ in range(2, depth + 1):  # one level per draft call, down to `depth`
            size = level.stop - level.start
            width = min(t.beam, size)
            if not greedy and scores.shape[1] + width * t.topk > t.max_nodes:
                break  # sampling never prunes what it drew, so it only draws what fits
            chosen = level.start + scores[:, level].topk(width, dim=1).indices  # [n, width]
            chosen_scores = scores.gather(1, chosen)
            # Every level is grown, also where no row has a node worth expanding: knowing that would take a read
            # of the device. Sampling must grow every level anyway, so that a row draws the same uniforms whatever
            # the other rows' trees look like.
            seen = ancestry.gather(1, chosen[..., None].expand(-1, -1, ancestry.shape[2]))  # [n, width, nodes]
            logits = self.runner.forward(
                tokens.gather(1, chosen),
                seen,
                offsets=chosen,  # node i of the tree lives in window slot i
                depth=seen.sum(-1) - 1,  # position past kv_len: depth - 1, depth = ancestors incl. itself
            )
            calls += 1
            dist = self._distribution(self._align_vocab(logits), params)  # [n, width, V]
            child_tokens, child_probs = self._children(dist, t.topk, rng)  # [n, width, topk]
            # A child of a node below min_score is dropped, decided by its parent's score alone.
            child_scores = torch.where(
                chosen_scores[..., None] > t.min_score, chosen_scores[..., None] * child_probs, -1.0
            )
            level = slice(tokens.shape[1], tokens.shape[1] + width * t.topk)
            tokens = torch.cat([tokens, child_tokens.flatten(1)], 1)
            parents = torch.cat([parents, chosen.repeat_interleave(t.topk, dim=1)], 1)
            scores = torch.cat([scores, child_scores.flatten(1)], 1)
            # A child sees what its parent sees, and itself.
            born = width * t.topk
            ancestry = torch.cat(
                [
                    torch.nn.functional.pad(ancestry, (0, born)),
                    torch.cat([seen.repeat_interleave(t.topk, dim=1), _identity(n, born, tokens.device)], 2),
                ],
                1,
            )
            if not greedy:
                node_dists.append(dist.repeat_interleave(t.topk, dim=1))

        keep = (scores > 0) & self.active[:n, None]
        if greedy:
            keep &= scores >= t.min_score
            # The best max_nodes; a stable sort ranks a parent before its children (a child's score is lower or
            # equal, and its index higher), so the kept set is always a tree.
            rank = torch.empty_like(scores, dtype=torch.long).scatter_(
                1,
                torch.sort(-scores, dim=1, stable=True).indices,
                torch.arange(scores.shape[1], device=scores.device).expand_as(scores),
            )
            keep &= rank < t.max_nodes
        dists = torch.cat(node_dists, 1) if node_dists else None
        return _compact(
            tokens, parents, ancestry, keep, dists, calls, width=min(keep.shape[1], t.max_nodes), children=t.topk
        )

    def _distribution(self, logits: torch.Tensor, params) -> torch.Tensor:
        # Greedy ranks nodes by the draft's plain probabilities; sampling must use exactly the p it draws from.
        return logits.float().softmax(-1) if params.greedy else probs_from_logits(logits, params)

    @staticmethod
    def _children(dist: torch.Tensor, k: int, rng) -> tuple[torch.Tensor, torch.Tensor]:
        """k children of each distribution [..., V]: its top-k (greedy), or k draws without replacement."""
        if rng is None:
            probs, tokens = dist.topk(k, dim=-1)
            return tokens, probs
        shape = dist.shape
        # Gumbel top-k: the k largest log p + Gumbel noise are a sample without replacement from p. In float64 the
        # noise reaches 36.7 nats (float32 stops at 16.6, so a token ~19 nats below the top could never come
        # first); a uniform of exactly 0 (odds 2^-53) would give a key of -inf, hence the clamp.
        uniforms = rng.uniforms(shape[0], dist[0].numel()).double().reshape(shape)
        keys = dist.double().log() - (-uniforms.clamp_(min=torch.finfo(torch.float64).tiny).log()).log()
        tokens = keys.topk(k, dim=-1).indices
        probs = dist.gather(-1, tokens)
        # Where p has fewer than k tokens, the extra "children" have probability 0: mark them invalid.
        return tokens, torch.where(probs > 0, probs, -1.0)


def _identity(n: int, k: int, device) -> torch.Tensor:
    return torch.eye(k, dtype=torch.bool, device=device).expand(n, k, k)


def _compact(tokens, parents, ancestry, keep, dists, calls, width: int, children: int) -> Proposal:
    """Move the kept nodes of each row to the front (in their breadth-first order) and renumber parents. The
    proposal is `width` wide: the most nodes any row can keep, known without reading the device. A tree of
    `calls` draft passes is that many levels deep, each node with at most `children` children."""
    order = torch.sort((~keep).long(), dim=1, stable=True).indices  # kept first, original order preserved
    new_index = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    parents = parents.gather(1, order)
    parents = torch.where(parents >= 0, new_index.gather(1, parents.clamp(min=0)), -1)
    lengths = keep.sum(1)
    if dists is not None:
        dists = dists.gather(1, order[:, :width, None].expand(-1, -1, dists.shape[-1]))
    kept = order[:, :width]
    k = ancestry.shape[1]
    ancestry = ancestry.gather(1, kept[..., None].expand(-1, -1, k)).gather(2, kept[:, None, :].expand(-1, width, -1))
    return Proposal(
        tokens.gather(1, kept), parents[:, :width], lengths, dists, calls, ancestry, levels=calls, children=children
    )
