"""The sampling verifier on hand-built draft (p) and target (q) distributions.

For a chain and for 2 to 4 siblings drawn from p without replacement (as the tree draft draws them), the first
committed token must be distributed exactly as q. Each case draws DRAWS times in one batched call, and a
chi-square test compares the counts with q. The same test is shown to reject three plausible slips of the
verifier's rules, so a green run means something.
"""

import pytest
import torch
from scipy.stats import chisquare

import specvlm.specdec.verify as verify
from specvlm.specdec.proposal import Proposal
from specvlm.specdec.sampling import SamplingParams

DRAWS = 200_000
CASES = {
    # q has a zero and two equal modes; p prefers the token q never picks
    "skewed": ([0.02, 0.49, 0.49, 0.0], [0.6, 0.2, 0.1, 0.1]),
    "close": ([0.1, 0.2, 0.3, 0.25, 0.15], [0.15, 0.2, 0.25, 0.25, 0.15]),
    "far": ([0.7, 0.1, 0.1, 0.05, 0.05], [0.05, 0.05, 0.1, 0.1, 0.7]),
}


def first_committed_tokens(q: list[float], p: list[float], siblings: int, seed: int = 0) -> torch.Tensor:
    """Counts of the first committed token over DRAWS independent rows, each verifying `siblings` children of
    the root drawn from p without replacement."""
    q_t, p_t = torch.tensor(q), torch.tensor(p)
    vocab = len(q)
    generator = torch.Generator().manual_seed(seed)
    gumbel = -(-torch.rand(DRAWS, vocab, generator=generator).clamp(min=1e-12).log()).log()
    tokens = (p_t.log() + gumbel).topk(siblings, dim=1).indices  # Gumbel top-k: without replacement from p
    proposal = Proposal(
        tokens=tokens,
        parents=torch.full((DRAWS, siblings), -1),
        lengths=torch.full((DRAWS,), siblings),
        probs=p_t.expand(DRAWS, siblings, vocab),
        draft_calls=1,
        ancestry=torch.eye(siblings, dtype=torch.bool).expand(DRAWS, siblings, siblings),
    )
    logits = q_t.log().expand(DRAWS, siblings + 1, vocab)  # every position's target distribution is q
    uniforms = torch.rand(DRAWS, siblings + 1, generator=generator)
    verdict = verify.verify_sampling(logits, proposal, SamplingParams(temperature=1.0), uniforms)
    path_token = tokens.gather(1, verdict.path[:, :1].clamp(min=0)).squeeze(1)
    first = torch.where(verdict.accepted > 0, path_token, verdict.next_token)
    return torch.bincount(first, minlength=vocab)


def p_value(counts: torch.Tensor, q: list[float]) -> float:
    support = [i for i, x in enumerate(q) if x > 0]
    assert counts[[i for i, x in enumerate(q) if x == 0]].sum() == 0, "a token q never picks was committed"
    target = torch.tensor(q, dtype=torch.float64)[support]
    expected = target / target.sum() * DRAWS
    return chisquare(counts[support].double().numpy(), expected.numpy()).pvalue


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("siblings", [1, 2, 3, 4])
def test_first_committed_token_follows_the_target_exactly(case, siblings):
    q, p = CASES[case]
    assert p_value(first_committed_tokens(q, p, siblings), q) > 1e-3


def _no_renormalising(p, x):
    return p.scatter(1, x[:, None], 0.0)


def _target_instead_of_residual(q, p):
    return q


def _ignoring_the_draft(u, p_x, q_x):
    return u < q_x


@pytest.mark.parametrize(
    "rule, slip",
    [("without", _no_renormalising), ("residual", _target_instead_of_residual), ("accepts", _ignoring_the_draft)],
)
def test_the_distribution_test_catches_a_slip_in_each_rule(monkeypatch, rule, slip):
    monkeypatch.setattr(verify, rule, slip)
    worst = min(
        p_value(first_committed_tokens(*CASES[case], siblings), CASES[case][0]) for case in CASES for siblings in (2, 3)
    )
    assert worst < 1e-6, f"a verifier whose `{rule}` rule is wrong went unnoticed"
