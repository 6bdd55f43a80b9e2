"""Acceptance: given the target's logits over [last token, d_1 .. d_k], how many drafts survive and which token
the target adds after them.

Greedy: accept while d_i equals the target's argmax; the added token is the argmax after the accepted prefix.
So the output is, token for token, the target's own greedy decoding.

Sampling (Leviathan et al. 2023, Chen et al. 2023): accept d_i with probability min(1, q(d_i) / p(d_i)); at the
first rejection draw the added token from norm(max(0, q - p)); if every draft survives draw it from q. Each
committed token is then distributed exactly as if sampled from the target q. A deterministic draft (prompt
lookup) is the special case p = one-hot.
"""

from __future__ import annotations

import torch

from specvlm.specdec.drafts import Proposal
from specvlm.specdec.sampling import SamplingParams, probs_from_logits, sample_from


def _proposal_mask(proposal: Proposal) -> torch.Tensor:  # [n, k] True where a real draft token sits
    k = proposal.tokens.shape[1]
    return torch.arange(k, device=proposal.tokens.device)[None, :] < proposal.lengths[:, None]


def _leading_true(mask: torch.Tensor) -> torch.Tensor:  # [n, k] bool -> [n] length of the all-True prefix
    return mask.long().cumprod(1).sum(1)


def verify_greedy(logits: torch.Tensor, proposal: Proposal) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [n, k+1, V] -> (accepted [n], next_token [n])."""
    best = logits.argmax(-1)  # [n, k+1]
    k = proposal.tokens.shape[1]
    accepted = _leading_true((proposal.tokens == best[:, :k]) & _proposal_mask(proposal))
    return accepted, best.gather(1, accepted[:, None]).squeeze(1)


def verify_sampling(
    logits: torch.Tensor, proposal: Proposal, params: SamplingParams, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [n, k+1, V], uniforms [n, k+1] -> (accepted [n], next_token [n])."""
    n, k = proposal.tokens.shape
    q = probs_from_logits(logits, params)  # [n, k+1, V]
    rows = torch.arange(n, device=logits.device)
    if k == 0:
        return proposal.lengths.clone(), sample_from(q[:, 0], uniforms[:, 0])

    tokens = proposal.tokens[..., None]  # [n, k, 1]
    if proposal.probs is None:
        p = torch.zeros_like(q[:, :k]).scatter_(2, tokens, 1.0)
    else:
        p = proposal.probs
    q_draft = q[:, :k].gather(2, tokens).squeeze(2)  # [n, k] q(d_i)
    p_draft = p.gather(2, tokens).squeeze(2)  # [n, k] p(d_i) > 0: d_i was drawn from p
    # u < q/p, written without the division; accepts with probability min(1, q/p).
    survive = uniforms[:, :k] * p_draft < q_draft
    accepted = _leading_true(survive & _proposal_mask(proposal))

    q_next = q[rows, accepted]  # [n, V]
    rejected = accepted < proposal.lengths
    residual = (q_next - p[rows, accepted.clamp(max=k - 1)]).clamp_(min=0)
    # A rejection implies q(d) < p(d) somewhere, so the residual has mass; the check guards round-off only.
    use_residual = rejected & (residual.sum(-1) > 0)
    dist = torch.where(use_residual[:, None], residual, q_next)
    return accepted, sample_from(dist, uniforms[:, k])
