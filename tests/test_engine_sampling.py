"""Speculative sampling is lossless: the generated tokens follow the target's own sampling distribution.

The exact joint distribution of the first three generated tokens is enumerated from the target (top-k keeps it
to k^3 sequences) and compared with thousands of seeded engine runs by a chi-square test. The same test run on
deliberately wrong acceptance rules must reject them, which shows it has the power to catch a subtle bias.
"""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import specvlm.specdec.decode as decode_module
from specvlm.specdec.decode import DecodeConfig, SpeculativeDecoder
from specvlm.specdec.requests import Request
from specvlm.specdec.sampling import SamplingParams, probs_from_logits, sample_from
from specvlm.specdec.verify import Verdict, verify_sampling

PARAMS = SamplingParams(temperature=0.1, top_k=4)
LENGTH = 3
RUNS = 3000


def exact_distribution(fam, request: Request, params: SamplingParams, length: int) -> dict[tuple, float]:
    """P(first `length` generated tokens) under the target, by enumerating the (top-k bounded) support."""
    dist = {(): 1.0}
    for _ in range(length):
        grown = {}
        for prefix, mass in dist.items():
            ids = torch.tensor([request.input_ids + list(prefix)])
            with torch.no_grad():
                logits = fam.target(input_ids=ids, pixel_values=request.pixel_values).logits[0, -1]
            probs = probs_from_logits(logits, params)
            for token in torch.nonzero(probs).flatten().tolist():
                grown[prefix + (token,)] = mass * probs[token].item()
        dist = grown
    return dist


def sample_sequences(fam, draft: str, request: Request, params: SamplingParams, gamma: int) -> list[tuple]:
    config = DecodeConfig(max_new_tokens=LENGTH, sampling=params, max_rows=500)
    decoder = SpeculativeDecoder(fam.target, fam.draft(draft, gamma=gamma), config)
    out = []
    for start in range(0, RUNS, 500):
        batch = [Request(request.input_ids, request.pixel_values, seed=s) for s in range(start, start + 500)]
        out += [tuple(r.tokens) for r in decoder.generate(batch)]
    return out


def chi_square_p(samples: list[tuple], exact: dict[tuple, float]) -> float:
    assert all(s in exact for s in samples), "sampled a sequence the target gives zero probability"
    # Cells with tiny expectation are pooled so that the chi-square approximation holds.
    common = sorted(k for k, p in exact.items() if p * len(samples) >= 5)
    counts = {k: 0 for k in common}
    other = 0
    for s in samples:
        if s in counts:
            counts[s] += 1
        else:
            other += 1
    observed = [counts[k] for k in common] + [other]
    expected = [exact[k] * len(samples) for k in common]
    expected.append(len(samples) - sum(expected))
    return chisquare(observed, expected).pvalue


@pytest.fixture(scope="module")
def setup(family):
    request = family.request("what is in the picture?", image_seed=3)
    return request, exact_distribution(family, request, PARAMS, LENGTH)


@pytest.mark.parametrize(
    "draft,gamma", [("vlm_noisy", 2), ("vlm_noisy", 5), ("text_copy", 3), ("prompt_lookup", 3), ("none", 1)]
)
def test_sampling_matches_target_distribution(family, setup, draft, gamma):
    request, exact = setup
    samples = sample_sequences(family, draft, request, PARAMS, gamma)
    assert chi_square_p(samples, exact) > 1e-3


def _accept_everything(logits, proposal, params, uniforms):
    """Wrong: keeps every draft of a chain, so the output follows the draft."""
    q = probs_from_logits(logits, params)
    accepted = proposal.lengths.clone()
    path = torch.where(
        torch.arange(proposal.tokens.shape[1]) < accepted[:, None], torch.arange(proposal.tokens.shape[1]), -1
    )
    return Verdict(accepted, path, sample_from(q[torch.arange(len(accepted)), accepted], uniforms[:, -1]))


def _target_instead_of_residual(logits, proposal, params, uniforms):
    """Wrong: after a rejection, draws from q instead of norm(max(0, q - p))."""
    verdict = verify_sampling(logits, proposal, params, uniforms)
    q = probs_from_logits(logits, params)
    verdict.next_token = sample_from(q[torch.arange(len(verdict.accepted)), verdict.accepted], uniforms[:, -1])
    return verdict


@pytest.mark.parametrize("wrong_rule", [_accept_everything, _target_instead_of_residual])
def test_statistical_test_rejects_a_wrong_acceptance_rule(family, setup, monkeypatch, wrong_rule):
    request, exact = setup
    monkeypatch.setattr(decode_module, "verify_sampling", wrong_rule)
    samples = sample_sequences(family, "vlm_noisy", request, PARAMS, 2)
    assert chi_square_p([s for s in samples if s in exact], exact) < 1e-3


def test_same_seed_same_output_regardless_of_batch(family):
    config = DecodeConfig(max_new_tokens=12, sampling=SamplingParams(temperature=0.8, top_p=0.9))
    decoder = SpeculativeDecoder(family.target, family.draft("vlm_noisy", gamma=3), config)
    alone = decoder.generate([family.request("fox", seed=7)])[0].tokens
    together = decoder.generate([family.request(q, seed=s) for q, s in [("a", 1), ("fox", 7), ("b c d", 2)]])
    assert together[1].tokens == alone
    assert len({tuple(r.tokens) for r in together}) == 3


def test_top_p_keeps_the_smallest_set_covering_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.8)) > 0
    assert kept.tolist() == [True, True, False, False]
    kept = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.81)) > 0
    assert kept.tolist() == [True, True, True, False]


def test_inverse_cdf_sampling_never_picks_a_zero_probability_token():
    probs = torch.tensor([[0.3, 0.0, 0.7, 0.0]]).expand(1000, 4)
    tokens = sample_from(probs, torch.linspace(0, 0.9999, 1000))
    assert set(tokens.tolist()) == {0, 2}
    assert np.isclose((tokens == 0).float().mean().item(), 0.3, atol=0.01)


def test_inverse_cdf_sampling_gives_every_tail_token_its_own_share():
    """One confident distribution over 2^17 tokens: the top token holds 0.997, every other token 2.3e-8, below
    the spacing of float32 numbers near 1 (6e-8), so a float32 cumulative sum gives many of them no width at all.
    A uniform in the middle of a token's exact share of [0, 1) must draw that token."""
    vocab = 2**17
    probs = torch.full((vocab,), 0.003 / (vocab - 1))
    probs[0] = 0.997
    cdf = probs.double().cumsum(0)
    tokens = torch.arange(1, vocab, 97)
    middles = (cdf[tokens - 1] + cdf[tokens]) / 2 / cdf[-1]
    drawn = sample_from(probs, middles)  # one distribution, a uniform per token
    assert (drawn == tokens).all(), f"{int((drawn != tokens).sum())} of {len(tokens)} tail tokens not drawn"
