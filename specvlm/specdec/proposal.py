"""What a draft hands to the verifier: a tree of draft tokens per row, a chain being the one-child case.

For each of the n rows there are k node slots, in breadth-first order (a parent always precedes its children):

    tokens[row, i]    the draft token of node i
    parents[row, i]   index of node i's parent, or -1 when its parent is the root (the row's last committed token)
    lengths[row]      how many node slots are real; the rest is padding
    probs[row, i]     the draft distribution node i was drawn from (its parent's), for sampling; None when the
                      draft is deterministic (prompt lookup) or decoding is greedy
    ancestry[row, i, j]  node j is node i or one of its ancestors: the verification mask. A tree draft builds it
                      level by level as it grows the tree, so nobody walks parent pointers afterwards.

Siblings appear in the order they were drawn, which sampling verification relies on. Because nodes are
breadth-first, dropping every node deeper than d keeps a prefix of the slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Proposal:
    tokens: torch.Tensor  # [n, k]
    parents: torch.Tensor  # [n, k]
    lengths: torch.Tensor  # [n]
    probs: torch.Tensor | None  # [n, k, V]
    draft_calls: int  # draft forward passes spent on it
    ancestry: torch.Tensor  # [n, k, k] bool
    is_chain: bool = False  # parents[:, i] == i - 1: the accepted path is always a prefix
    # Bounds on the tree's shape, known without reading the device: how many levels deep it can be, and how
    # many children a node can have (sampling verification loops over them). None: k, as for any k nodes.
    levels: int | None = None
    children: int | None = None

    def __post_init__(self):
        k = self.tokens.shape[1]
        self.levels = k if self.levels is None else min(self.levels, k)
        self.children = k if self.children is None else min(self.children, k)

    @classmethod
    def chain(cls, tokens: torch.Tensor, lengths: torch.Tensor, probs: torch.Tensor | None, draft_calls: int):
        n, k = tokens.shape
        parents = (torch.arange(k, device=tokens.device) - 1).expand(n, k)
        causal = torch.ones(k, k, dtype=torch.bool, device=tokens.device).tril().expand(n, k, k)
        return cls(tokens, parents, lengths, probs, draft_calls, causal, is_chain=True, children=1)

    @classmethod
    def empty(cls, n: int, device: torch.device) -> Proposal:
        """What autoregressive decoding 'proposes': nothing, so every step is one plain target token."""
        nothing = torch.zeros(n, 0, dtype=torch.long, device=device)
        return cls.chain(nothing, torch.zeros(n, dtype=torch.long, device=device), None, 0)

    @property
    def valid(self) -> torch.Tensor:  # [n, k]
        k = self.tokens.shape[1]
        return torch.arange(k, device=self.tokens.device)[None, :] < self.lengths[:, None]

    def depth(self) -> torch.Tensor:  # [n, k]: 1 for children of the root
        if self.is_chain:
            return (torch.arange(self.tokens.shape[1], device=self.tokens.device) + 1).expand_as(self.tokens)
        return self.ancestry.sum(-1)

    def row_depth(self) -> torch.Tensor:  # [n]: the depth of each row's deepest node (0: it proposed nothing)
        if self.is_chain:
            return self.lengths
        return (self.depth() * self.valid).amax(1) if self.tokens.shape[1] else self.lengths

    def verification_attend(self) -> torch.Tensor:  # [n, k+1, k+1]: window = [root, node 0, ..., node k-1]
        n, k = self.parents.shape
        attend = torch.zeros(n, k + 1, k + 1, dtype=torch.bool, device=self.parents.device)
        attend[:, :, 0] = True  # everyone sees the root
        attend[:, 1:, 1:] = self.ancestry
        return attend

    def limit_depth(self, max_depth: torch.Tensor) -> None:
        """Drop nodes deeper than max_depth[row] (a row may only generate so many more tokens)."""
        shallow = (self.depth() <= max_depth[:, None]) & self.valid
        # Breadth-first order makes the kept nodes a prefix.
        self.lengths = shallow.sum(1)
