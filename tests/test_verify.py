"""The sampling verifier on hand-built draft (p) and target (q) distributions.

For a chain and for 2 to 4 siblings drawn from p without replacement (by the tree draft's own sampler), the first
committed token must be distributed exactly as q. Each case draws DRAWS times in one batched call, and a
chi-square test compares the counts with q. The same test is shown to reject three plausible slips of the
verifier's rules, so a green run means something.
"""

import pytest
import torch
from scipy.stats import chisquare

import specvlm.specdec.verify as verify
from specvlm.specdec.proposal import Proposal
from specvlm.specdec.sampling import RowRandom, SamplingParams, probs_from_logits
from specvlm.specdec.tree import TreeDraft

DRAWS = 200_000
CASES = {
    # q has a zero and two equal modes; p prefers the token q never picks
    "skewed": ([0.02, 0.49, 0.49, 0.0], [0.6, 0.2, 0.1, 0.1]),
    "close": ([0.1, 0.2, 0.3, 0.25, 0.15], [0.15, 0.2, 0.25, 0.25, 0.15]),
    "far": ([0.7, 0.1, 0.1, 0.05, 0.05], [0.05, 0.05, 0.1, 0.1, 0.7]),
}


class _Uniforms:
    """Stands in for RowRandom (one generator per row) with one seeded generator: DRAWS rows at once."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def uniforms(self, n: int, count: int) -> torch.Tensor:
        return torch.rand(n, count, generator=self.generator, dtype=torch.float64)


def first_committed_tokens(
    q: list[float], p: torch.Tensor | list[float], siblings: int, seed: int = 0, draws: int = DRAWS, temperature=1.0
) -> torch.Tensor:
    """Counts of the first committed token over `draws` independent rows, each verifying `siblings` children of
    the root that the tree draft drew from p without replacement; q and p are the distributions after
    `temperature` (the target's logits are log q times it)."""
    p_t = torch.as_tensor(p, dtype=torch.float32)
    vocab = len(q)
    rng = _Uniforms(seed)
    tokens, _ = TreeDraft._children(p_t.expand(draws, vocab), siblings, rng)
    proposal = Proposal(
        tokens=tokens,
        parents=torch.full((draws, siblings), -1),
        lengths=torch.full((draws,), siblings),
        probs=p_t.expand(draws, siblings, vocab),
        draft_calls=1,
        ancestry=torch.eye(siblings, dtype=torch.bool).expand(draws, siblings, siblings),
    )
    logits = (torch.tensor(q).log() * temperature).expand(draws, siblings + 1, vocab)  # q at every position
    uniforms = rng.uniforms(draws, siblings + 1)
    verdict = verify.verify_sampling(logits, proposal, SamplingParams(temperature=temperature), uniforms)
    path_token = tokens.gather(1, verdict.path[:, :1].clamp(min=0)).squeeze(1)
    first = torch.where(verdict.accepted > 0, path_token, verdict.next_token)
    return torch.bincount(first, minlength=vocab)


def p_value(counts: torch.Tensor, q: list[float]) -> float:
    support = [i for i, x in enumerate(q) if x > 0]
    assert counts[[i for i, x in enumerate(q) if x == 0]].sum() == 0, "a token q never picks was committed"
    target = torch.tensor(q, dtype=torch.float64)[support]
    expected = target / target.sum() * counts.sum().item()
    return chisquare(counts[support].double().numpy(), expected.numpy()).pvalue


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("siblings", [1, 2, 3, 4])
def test_first_committed_token_follows_the_target_exactly(case, siblings):
    q, p = CASES[case]
    assert p_value(first_committed_tokens(q, p, siblings), q) > 1e-3


@pytest.mark.parametrize("siblings", [2, 3])
def test_a_draft_whose_tail_is_subnormal_still_follows_the_target(siblings):
    """At temperature 0.1 a top-1 logit gap of 9.3 is 93 nats: the draft's mass outside its top token is ~6e-41,
    below float32's smallest normal number. Once the top sibling is rejected, the next sibling's renormalised
    draft probability must be ~1 (it was ~2e-6, and then that sibling was accepted every time)."""
    temperature = 0.1
    p = probs_from_logits(torch.tensor([0.0, -9.3, -9.4, -9.5, -9.6]), SamplingParams(temperature=temperature))
    assert 0 < p[1:].sum() < torch.finfo(torch.float32).tiny
    q = [0.5, 0.2, 0.15, 0.1, 0.05]
    counts = first_committed_tokens(q, p, siblings, draws=20_000, temperature=temperature)
    assert p_value(counts, q) > 1e-3, counts.tolist()


def test_tree_noise_reaches_tokens_far_below_the_top():
    """Gumbel top-k draws a token first when its log p plus noise beats the others'. A token 30 nats below the
    top must keep that chance when its uniform is near 1 (float32 uniforms stop the noise at 16.6 nats)."""
    top_uniform, tail_uniform = 0.5, 1 - 2.0**-53

    class Extremes:
        def uniforms(self, n, count):
            return torch.tensor([[top_uniform, tail_uniform]], dtype=torch.float64)

    p = torch.tensor([[1.0, torch.exp(torch.tensor(-30.0)).item()]])
    tokens, _ = TreeDraft._children(p, 1, Extremes())
    assert tokens.item() == 1
    assert RowRandom([0], torch.device("cpu")).uniforms(1, 4).dtype == torch.float64


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
