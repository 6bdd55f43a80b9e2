"""Acceptance: given the target's logits over [root, node 0, ..., node k-1] (the root is the last committed token),
which path of draft nodes survives and which token the target adds after it. One verifier serves chains and
trees, whatever draft made them.

Greedy: from the root, step to the child whose token is the target's argmax there, while one exists; the added
token is the target's argmax at the last node reached. So the output is, token for token, the target's own
greedy decoding.

Sampling: recursive rejection sampling over siblings (SpecInfer; Jeon et al. 2024 for siblings drawn without
replacement). At a node with target distribution q and children x_1, x_2, ... drawn in that order without
replacement from the draft distribution p: accept x_i with probability min(1, q(x_i) / p(x_i)) and descend;
on rejection set q <- norm(max(0, q - p)) and p <- norm(p without x_i) and try the next sibling. When no child
is accepted (or there are none) the added token is drawn from the current q. Each committed token is then
distributed exactly as the target's own sample. A chain is the one-child case (Leviathan et al., Chen et al.);
a deterministic draft (prompt lookup) has p = one-hot.
"""

from __future__ import annotations

import torch

from specvlm.specdec.proposal import Proposal
from specvlm.specdec.sampling import SamplingParams, probs_from_logits, sample_from


class Verdict:
    """accepted [n] nodes on the accepted path, path [n, k] their indices (-1 padded), next_token [n]."""

    def __init__(self, accepted: torch.Tensor, path: torch.Tensor, next_token: torch.Tensor):
        self.accepted, self.path, self.next_token = accepted, path, next_token


def verify_greedy(logits: torch.Tensor, proposal: Proposal) -> Verdict:
    best = logits.argmax(-1)  # [n, k+1]
    k = proposal.tokens.shape[1]
    if proposal.is_chain or k == 0:  # an empty tree (every node pruned) verifies as an empty chain
        # The path is a prefix: the leading run of drafts that equal the target's argmax.
        match = (proposal.tokens == best[:, :k]) & proposal.valid
        accepted = match.long().cumprod(1).sum(1)
        path = torch.where(
            torch.arange(k, device=best.device) < accepted[:, None], torch.arange(k, device=best.device), -1
        )
        return Verdict(accepted, path, best.gather(1, accepted[:, None]).squeeze(1))

    # A node survives when it and each of its ancestors carry the target's argmax after their parent. Siblings
    # carry distinct tokens in every tree draft here; should two match, the first one counts, as in a walk.
    want = best.gather(1, proposal.parents + 1)  # the target's pick after each node's parent (slot 0: root)
    match = (proposal.tokens == want) & proposal.valid
    same_parent_before = (proposal.parents[:, :, None] == proposal.parents[:, None, :]).tril(-1)
    match &= ~(same_parent_before & match[:, None, :]).any(2)
    on_path = ~(proposal.ancestry & ~match[:, None, :]).any(2)  # [n, k]
    accepted = on_path.sum(1)
    # Breadth-first order puts the path's nodes in depth order.
    index = torch.arange(k, device=best.device)
    order = torch.sort((~on_path).long(), dim=1, stable=True).indices
    path = torch.where(index < accepted[:, None], order, -1)
    last = path.gather(1, (accepted - 1).clamp(min=0)[:, None]).squeeze(1)  # -1 (the root) when nothing survived
    return Verdict(accepted, path, best.gather(1, (last + 1)[:, None]).squeeze(1))


def _normalise(p: torch.Tensor) -> torch.Tensor:
    """p / p.sum(-1), exact also where the total is subnormal: a very confident draft (a top-1 logit gap over
    temperature of ~87-103 nats) leaves float32 tails below 1e-38 once its top token is removed, and dividing by
    such a total loses it. Dividing by the largest entry first puts that entry at 1, so the sum is >= 1 (a
    quotient of two subnormals is as exact as any float32 division); a row of zeros stays zeros."""
    top = p.amax(-1, keepdim=True)
    scaled = p / torch.where(top > 0, top, 1.0)
    return scaled / scaled.sum(-1, keepdim=True).clamp(min=1.0)


# The three rules of rejection sampling over siblings, named so that each is stated (and tested) once.
def accepts(u: torch.Tensor, p_x: torch.Tensor, q_x: torch.Tensor) -> torch.Tensor:
    """Accept draft token x with probability min(1, q(x) / p(x)), u uniform in [0, 1)."""
    return u * p_x < q_x


def residual(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """After a rejection the target distribution becomes norm(max(0, q - p))."""
    return _normalise((q - p).clamp(min=0))


def without(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The draft distribution of the next sibling: p with the rejected x removed, renormalised (siblings are drawn
    without replacement)."""
    return _normalise(p.scatter(1, x[:, None], 0.0))


def verify_sampling(
    logits: torch.Tensor, proposal: Proposal, params: SamplingParams, uniforms: torch.Tensor
) -> Verdict:
    """uniforms [n, k+1]: one per sibling tried (at most k) and one for the added token."""
    n, k = proposal.tokens.shape
    device = logits.device
    rows = torch.arange(n, device=device)
    q_nodes = probs_from_logits(logits, params)  # [n, k+1, V]
    if proposal.probs is not None:
        p_nodes = proposal.probs
    else:
        p_nodes = torch.zeros_like(q_nodes[:, 1:]).scatter_(2, proposal.tokens[..., None], 1.0)

    node = torch.full((n,), -1, device=device)
    path = torch.full((n, k), -1, device=device)
    accepted = torch.zeros(n, dtype=torch.long, device=device)
    tries = torch.zeros(n, dtype=torch.long, device=device)  # uniforms used per row (keeps rows independent)
    q = q_nodes[:, 0]
    searching = torch.ones(n, dtype=torch.bool, device=device)
    # The loops run to the proposal's static bounds (levels, children per node), not to what this step's trees
    # hold: a row with nothing left to try changes nothing, and nobody reads the device to stop early.
    for _ in range(proposal.levels):
        children = (proposal.parents == node[:, None]) & proposal.valid & searching[:, None]  # [n, k]
        rank = children.long().cumsum(1) - 1
        first = children.long().argmax(1)
        p = p_nodes[rows, first]  # siblings share their parent's distribution
        moved = torch.zeros(n, dtype=torch.bool, device=device)
        for sibling in range(proposal.children):
            pick = children & (rank == sibling)
            trying = pick.any(1) & ~moved
            child = pick.long().argmax(1)
            x = proposal.tokens[rows, child]
            u = uniforms[rows, tries]
            tries += trying
            accept = trying & accepts(u, p[rows, x], q[rows, x])
            reject = trying & ~accept
            q = torch.where(reject[:, None], residual(q, p), q)
            p = torch.where(reject[:, None], without(p, x), p)
            at = accepted.clamp(max=k - 1)  # where this level's node goes on the path (rows that accept: < k)
            path[rows, at] = torch.where(accept, child, path[rows, at])
            node = torch.where(accept, child, node)
            moved |= accept
        accepted += moved
        searching &= moved
        q = torch.where(moved[:, None], q_nodes[rows, node + 1], q)
    return Verdict(accepted, path, sample_from(q, uniforms[:, -1]))
