"""Greedy speculative decoding is lossless: token-identical to the target's own greedy `generate`."""

import pytest

from specvlm.specdec.decode import DecodeConfig, SpeculativeDecoder
from tests.fixtures_models import SHAPES

MAX_NEW = 24
DRAFTS = ["none", "text_random", "text_copy", "vlm_noisy", "vlm_self", "prompt_lookup"]


@pytest.fixture(scope="module")
def references(families):
    """Per family: 8 requests with different prompt lengths and images, and HF generate's output for each."""
    out = {}
    for name, fam in families.items():
        requests = fam.requests(8)
        out[name] = (requests, [fam.reference(r, MAX_NEW) for r in requests])
    return out


def decode(fam, draft: str, gamma: int, requests, max_new=MAX_NEW, eos=None, rows=None, adaptive=False):
    """All requests as one batch (or `rows` at a time, the rest joining as rows finish), at a fixed depth gamma
    unless `adaptive`."""
    eos_ids = (fam.tokenizer.eos_token_id if eos is None else eos,)
    config = DecodeConfig(
        max_new_tokens=max_new, eos_token_ids=eos_ids, max_rows=rows or max(1, len(requests)), adaptive=adaptive
    )
    return SpeculativeDecoder(fam.target, fam.draft(draft, gamma=gamma), config).generate(requests)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("draft", DRAFTS)
@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_matches_target_generate_batch_1_to_8(families, references, shape, draft, gamma):
    if draft == "none" and gamma != 1:
        pytest.skip("gamma means nothing without a draft")
    fam = families[shape]
    requests, expected = references[shape]
    for batch in (1, 2, 5, 8):
        results = decode(fam, draft, gamma, requests[:batch])
        for i, result in enumerate(results):
            assert result.error is None
            assert result.tokens == expected[i], f"batch {batch}, row {i}: diverged from target greedy"


@pytest.mark.parametrize("shape", list(SHAPES))
def test_test_drafts_cover_no_some_and_full_acceptance(families, references, shape):
    """The drafts above are only a meaningful test if they exercise rejection, partial and full acceptance."""
    fam = families[shape]
    requests, _ = references[shape]

    def rate(draft):
        results = decode(fam, draft, 3, requests)
        return sum(r.metrics.accepted_tokens for r in results) / sum(r.metrics.proposed_tokens for r in results)

    assert rate("vlm_self") == 1.0
    assert 0.0 < rate("vlm_noisy") < 1.0
    assert rate("text_random") < 0.3


def test_self_draft_commits_gamma_plus_one_per_step(family, references):
    requests, _ = references["mha"]
    results = decode(family, "vlm_self", 5, requests[:4])
    for r in results:
        # 24 tokens in steps of 6: exactly 4 target passes.
        assert r.metrics.target_calls == 4 and r.metrics.block_efficiency == 6.0
        assert r.metrics.accepted_per_step == [5, 5, 5, 5]


def test_autoregressive_mode_takes_one_target_pass_per_token(family, references):
    requests, _ = references["mha"]
    (result,) = decode(family, "none", 1, requests[:1])
    assert result.metrics.target_calls == MAX_NEW and result.metrics.block_efficiency == 1.0
    assert result.metrics.draft_calls == 0 and result.metrics.proposed_tokens == 0
