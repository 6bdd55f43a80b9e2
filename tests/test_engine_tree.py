"""Dynamic tree drafting and adaptive chains are lossless, and trees have the shape they claim."""

import pytest
import torch

import specvlm.specdec.decode as decode_module
from specvlm.specdec.decode import DecodeConfig, SpeculativeDecoder
from specvlm.specdec.sampling import SamplingParams, probs_from_logits, sample_from
from specvlm.specdec.tree import TreeSettings
from specvlm.specdec.verify import Verdict
from tests.fixtures_models import SHAPES
from tests.test_engine_sampling import LENGTH, PARAMS, RUNS, chi_square_p, exact_distribution

MAX_NEW = 20
TREES = {
    "narrow": TreeSettings(topk=2, beam=1, max_nodes=6),
    "wide": TreeSettings(topk=3, beam=3, max_nodes=16),
    "pruned": TreeSettings(topk=4, beam=2, max_nodes=10, min_score=1e-3),
}


@pytest.fixture(scope="module")
def references(families):
    out = {}
    for name, fam in families.items():
        requests = fam.requests(8)
        out[name] = (requests, [fam.reference(r, MAX_NEW) for r in requests])
    return out


GREEDY = SamplingParams()


def run(fam, draft, requests, gamma=4, tree=None, min_confidence=0.0, max_new=MAX_NEW, sampling=GREEDY):
    """Decode with the family's draft `draft` at a fixed depth `gamma` (the controller does not adapt it)."""
    config = DecodeConfig(
        max_new_tokens=max_new,
        sampling=sampling,
        eos_token_ids=(fam.tokenizer.eos_token_id,),
        max_rows=len(requests),
        adaptive=False,
    )
    draft = fam.draft(draft, gamma=gamma, tree=tree, min_confidence=min_confidence)
    return SpeculativeDecoder(fam.target, draft, config).generate(requests)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("draft", ["vlm_self", "vlm_noisy", "text_copy"])
def test_greedy_tree_matches_target_generate_batch_1_to_8(families, references, shape, tree, draft):
    fam = families[shape]
    requests, expected = references[shape]
    for batch in (1, 3, 8):
        results = run(fam, draft, requests[:batch], tree=TREES[tree])
        assert [r.tokens for r in results] == expected[:batch], f"batch {batch}"
        for r in results:
            assert all(0 <= a <= 4 for a in r.metrics.accepted_per_step)
            assert all(k <= TREES[tree].max_nodes for k in r.metrics.nodes_per_step)


@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_greedy_tree_edge_cases_match(family, references, gamma):
    requests, _ = references["mha"]
    for max_new in (1, 2, 7):
        results = run(family, "vlm_noisy", requests, gamma=gamma, tree=TREES["wide"], max_new=max_new)
        assert [r.tokens for r in results] == [family.reference(r, max_new) for r in requests]


def test_self_draft_tree_accepts_full_depth(family, references):
    """With the target as its own draft the greedy path is always in the tree: tau = depth + 1."""
    requests, _ = references["mha"]
    tree = TreeSettings(topk=2, beam=8, max_nodes=30)  # expands and keeps every node: 2 + 4 + 8 + 16
    results = run(family, "vlm_self", requests[:3], gamma=4, tree=tree)
    for r in results:
        assert r.metrics.accepted_per_step == [4, 4, 4, 4]
        assert r.metrics.draft_calls == 4 * 4  # per step: the pending feed plus one forward per deeper level


def test_tree_proposals_are_well_formed_trees(family, references):
    requests, _ = references["mha"]
    draft = family.draft("vlm_noisy", gamma=4, tree=TREES["wide"])
    draft.allocate(len(requests), 128)
    assert draft.admit(list(range(len(requests))), requests) == {}
    proposal = draft.propose(len(requests), 4, SamplingParams(), None)
    k = proposal.tokens.shape[1]
    valid = proposal.valid
    index = torch.arange(k)
    assert bool(((proposal.parents < index) | ~valid).all()), "a parent precedes its children"
    assert bool((proposal.lengths <= TREES["wide"].max_nodes).all())
    for row in range(len(requests)):
        n = int(proposal.lengths[row])
        parents, tokens = proposal.parents[row, :n].tolist(), proposal.tokens[row, :n].tolist()
        assert all(p < n for p in parents), "kept nodes form a tree: every parent is kept"
        siblings = {}
        for p, t in zip(parents, tokens):
            siblings.setdefault(p, []).append(t)
        assert all(len(set(ts)) == len(ts) for ts in siblings.values()), "siblings carry distinct tokens"
    assert torch.equal(
        proposal.ancestry & valid[:, :, None] & valid[:, None, :], ancestors_of(proposal.parents, valid)
    ), "the ancestry the draft built level by level is the one its parent pointers give"


def ancestors_of(parents: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[n, k, k]: node j is valid node i or one of its ancestors, by walking parent pointers."""
    n, k = parents.shape
    seen = torch.zeros(n, k, k, dtype=torch.bool)
    for row in range(n):
        for i in range(k):
            node = i
            while node >= 0 and bool(valid[row, i]):
                seen[row, i, node] = True
                node = int(parents[row, node])
    return seen


@pytest.mark.parametrize("threshold", [0.004, 0.0065])
def test_adaptive_chain_is_lossless_and_stops_early(family, references, threshold):
    requests, expected = references["mha"]
    results = run(family, "vlm_noisy", requests, gamma=5, min_confidence=threshold)
    assert [r.tokens for r in results] == expected
    steps = [k for r in results for k in r.metrics.nodes_per_step]
    assert min(steps) < 5 and max(steps) > 1, "chains of several lengths"


TREE_SAMPLING = TreeSettings(topk=2, beam=2, max_nodes=12)


@pytest.fixture(scope="module")
def sampling_setup(family):
    request = family.request("what is in the picture?", image_seed=3)
    return request, exact_distribution(family, request, PARAMS, LENGTH)


def sample_tree_sequences(fam, draft, request, gamma=3):
    from specvlm.specdec.requests import Request

    out = []
    for start in range(0, RUNS, 500):
        batch = [Request(request.input_ids, request.pixel_values, seed=s) for s in range(start, start + 500)]
        out += [
            tuple(r.tokens)
            for r in run(fam, draft, batch, gamma=gamma, tree=TREE_SAMPLING, max_new=LENGTH, sampling=PARAMS)
        ]
    return out


@pytest.mark.parametrize("draft", ["vlm_noisy", "text_copy"])
def test_tree_sampling_matches_target_distribution(family, sampling_setup, draft):
    request, exact = sampling_setup
    assert chi_square_p(sample_tree_sequences(family, draft, request), exact) > 1e-3


def test_adaptive_chain_sampling_matches_target_distribution(family, sampling_setup):
    from specvlm.specdec.requests import Request

    request, exact = sampling_setup
    samples = []
    for start in range(0, RUNS, 500):
        batch = [Request(request.input_ids, request.pixel_values, seed=s) for s in range(start, start + 500)]
        results = run(family, "vlm_noisy", batch, gamma=3, min_confidence=0.3, max_new=LENGTH, sampling=PARAMS)
        samples += [tuple(r.tokens) for r in results]
    assert chi_square_p(samples, exact) > 1e-3


def _first_sibling_only_but_claims_tree(logits, proposal, params, uniforms):
    """Wrong: accepts the first child of each node with probability 1."""
    n, k = proposal.tokens.shape
    rows = torch.arange(n)
    q = probs_from_logits(logits, params)
    node = torch.full((n,), -1)
    path = torch.full((n, k), -1)
    accepted = torch.zeros(n, dtype=torch.long)
    for depth in range(k):
        children = (proposal.parents == node[:, None]) & proposal.valid
        has = children.any(1)
        if not bool(has.any()):
            break
        child = children.long().argmax(1)
        path[rows[has], depth] = child[has]
        node = torch.where(has, child, node)
        accepted += has
    return Verdict(accepted, path, sample_from(q[rows, node + 1], uniforms[:, -1]))


@pytest.mark.parametrize("wrong_rule", [_first_sibling_only_but_claims_tree])
def test_tree_statistical_test_rejects_a_wrong_rule(family, sampling_setup, monkeypatch, wrong_rule):
    request, exact = sampling_setup
    monkeypatch.setattr(decode_module, "verify_sampling", wrong_rule)
    samples = sample_tree_sequences(family, "vlm_noisy", request)
    assert chi_square_p([s for s in samples if s in exact], exact) < 1e-3
