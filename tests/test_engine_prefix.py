"""Prefill sharing is lossless: requests about one image prefill its prefix once, and decode exactly as the
target alone would, mixed with requests that share nothing, joining the batch at different times, greedy or
sampled; requests about different images never share, whatever their names."""

import functools

import pytest
import torch

from specvlm.specdec import prefill as prefill_module
from specvlm.specdec import prefix_cache
from specvlm.specdec.decode import DecodeConfig, SpeculativeDecoder
from specvlm.specdec.prefill import prefill
from specvlm.specdec.prefix import common_length, image_key, shared_prefixes
from specvlm.specdec.requests import Request
from specvlm.specdec.sampling import SamplingParams
from tests.fixtures_models import QUESTIONS

MAX_NEW = 10
GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def mixed(family):
    """Five questions about each of two images (one asked twice), between questions about images of their own."""
    requests = []
    for q in range(5):
        requests += [family.request(QUESTIONS[q], image_seed=0), family.request(QUESTIONS[4 - q], image_seed=1)]
        if q % 2 == 0:
            requests.append(family.request(QUESTIONS[5 + q // 2], image_seed=2 + q))
    requests.append(family.request(QUESTIONS[0], image_seed=0))
    return requests, [family.reference(r, MAX_NEW) for r in requests]


def decoder(family, draft, share, rows=16, sampling=GREEDY):
    config = DecodeConfig(
        max_new_tokens=MAX_NEW,
        eos_token_ids=(family.tokenizer.eos_token_id,),
        max_rows=rows,
        adaptive=False,
        sampling=sampling,
        share_prefill=share,
    )
    return SpeculativeDecoder(family.target, family.draft(draft, gamma=3), config)


def counting_tower(monkeypatch, model) -> list[int]:
    """Counts the images each vision tower call reads."""
    calls = []
    original = model.get_image_features

    @functools.wraps(original)
    def counted(*args, **kwargs):
        calls.append(len(kwargs["pixel_values"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "get_image_features", counted)
    return calls


@pytest.mark.parametrize("draft", ["none", "vlm_noisy", "text_copy", "prompt_lookup"])
@pytest.mark.parametrize("rows", [16, 4])
def test_requests_sharing_an_image_prefill_decode_like_target_generate(family, mixed, draft, rows):
    """rows=16 admits everything at once; rows=4 admits requests of one image at different steps."""
    requests, expected = mixed
    results = decoder(family, draft, share=True, rows=rows).generate(requests)
    assert [r.tokens for r in results] == expected


def test_the_vision_tower_reads_each_distinct_image_once(family, mixed, monkeypatch):
    requests, expected = mixed
    calls = counting_tower(monkeypatch, family.target)
    results = decoder(family, "none", share=True).generate(requests)
    assert [r.tokens for r in results] == expected
    assert calls == [5]  # images 0 and 1, and three images asked about once
    calls.clear()
    decoder(family, "none", share=False).generate(requests)
    assert calls == [len(requests)]


@pytest.mark.parametrize("draft", ["vlm_noisy", "text_copy"])
def test_a_draft_proposes_the_same_with_sharing_on_and_off(family, mixed, draft):
    """The draft's cache after a shared prefill is its own prefill's: every step accepts the same tokens."""
    requests, _ = mixed
    on, off = (decoder(family, draft, share=share).generate(requests) for share in (True, False))
    assert [r.metrics.accepted_per_step for r in on] == [r.metrics.accepted_per_step for r in off]
    assert sum(r.metrics.accepted_tokens for r in on) > 0


@pytest.mark.parametrize("draft", ["none", "vlm_noisy"])
def test_sampled_outputs_are_unchanged_by_sharing(family, mixed, draft):
    requests, _ = mixed
    seeded = [Request(r.input_ids, r.pixel_values, seed=s) for s, r in enumerate(requests)]
    sampling = SamplingParams(temperature=0.9, top_p=0.95)
    on, off = (decoder(family, draft, share=share, sampling=sampling).generate(seeded) for share in (True, False))
    assert [r.tokens for r in on] == [r.tokens for r in off]
    assert len({tuple(r.tokens) for r in on}) > 1


@pytest.mark.parametrize("text_view", [False, True])
def test_shared_rows_hold_the_cache_their_own_prefill_computes(family, mixed, text_view):
    """Each row's keys and values, at every committed slot, as an unshared prefill computes them (positions of the
    rest of a prompt continue where the prefix ends)."""
    requests, _ = mixed
    token = family.image_token_id
    model = family.drafts["text_copy"] if text_view else family.target
    prompts = [[t for t in r.input_ids if t != token] if text_view else r.input_ids for r in requests]
    capacity = max(map(len, prompts))
    shared, order, _ = prefill(model, requests, prompts, capacity, use_images=not text_view, share=True)
    alone, good, _ = prefill(model, requests, prompts, capacity, use_images=not text_view)
    assert sorted(order) == good and order != good  # the grouped requests come first
    for row, i in enumerate(order):
        length = len(prompts[i]) - 1
        assert shared.kv_host[row] == alone.kv_host[i] == length
        assert int(shared.kv_len[row]) == length
        for mine, theirs in zip(shared.cache.keys + shared.cache.values, alone.cache.keys + alone.cache.values):
            torch.testing.assert_close(mine[row, :, :length], theirs[i, :, :length], rtol=1e-5, atol=1e-5)


def test_only_the_same_image_behind_the_same_tokens_shares(family):
    one = family.request(QUESTIONS[0], image_seed=0)
    again = family.request(QUESTIONS[1], image_seed=0)
    other = family.request(QUESTIONS[1], image_seed=1)
    token = family.image_token_id
    groups = shared_prefixes([one, again, other], [r.input_ids for r in (one, again, other)], token, True)
    assert [g.members for g in groups] == [(0, 1)]
    last_image = max(j for j, t in enumerate(one.input_ids) if t == token)
    assert last_image < groups[0].length < len(one.input_ids) - 1
    # A caller's content key decides: different pixels under one key would share, so the key must be the content.
    assert image_key(one) == image_key(again) != image_key(other)
    named = [Request(r.input_ids, r.pixel_values, image_key="sha256:abc") for r in (one, other)]
    assert image_key(named[0]) == image_key(named[1]) == "sha256:abc"
    assert image_key(Request(one.input_ids)) is None


@pytest.mark.parametrize("draft", ["none", "vlm_noisy", "text_copy"])
def test_requests_admitted_one_by_one_start_from_a_prefix_an_earlier_admission_kept(family, mixed, draft, monkeypatch):
    """At one row, every request is admitted alone: those about an image a recent request showed copy its cached
    prefix (the vision tower reads each distinct image once, the draft's too) and decode like target generate."""
    requests, expected = mixed
    target_calls = counting_tower(monkeypatch, family.target)
    engine = decoder(family, draft, share=True, rows=1)
    draft_calls = counting_tower(monkeypatch, engine.draft.model) if draft == "vlm_noisy" else []
    results = engine.generate(requests)
    assert [r.tokens for r in results] == expected
    assert sum(target_calls) == 5  # images 0 and 1, and three images asked about once
    assert engine.prefix_cache.hits == len(requests) - 5
    if draft == "vlm_noisy":
        assert sum(draft_calls) == 5
        assert engine.draft.prefix_cache.hits == len(requests) - 5
    off = decoder(family, draft, share=False, rows=1).generate(requests)
    assert [r.metrics.accepted_per_step for r in results] == [r.metrics.accepted_per_step for r in off]


def test_a_prefix_cache_too_small_for_every_image_evicts_and_stays_exact(family, mixed, monkeypatch):
    """Two entries for five images asked about in turn: the least recently used prefix makes way, and a request
    whose image was evicted prefills it again."""
    monkeypatch.setattr(prefix_cache, "MAX_ENTRIES", 2)
    requests, expected = mixed
    calls = counting_tower(monkeypatch, family.target)
    engine = decoder(family, "vlm_noisy", share=True, rows=1)
    assert [r.tokens for r in engine.generate(requests)] == expected
    # Images 0 and 1 alternate, an image asked about once sits between them every other turn: one of them is
    # evicted then, and is read again.
    assert 5 < sum(calls) < len(requests)
    assert engine.prefix_cache.hits == len(requests) - sum(calls)


def test_a_kept_prefix_serves_only_the_same_image_content(family):
    """The same question about different images, admitted one at a time: no request starts from another image's
    kept prefix, and each decodes like target generate."""
    requests = [family.request(QUESTIONS[0], image_seed=seed) for seed in (0, 1, 0, 2, 1)]
    engine = decoder(family, "vlm_noisy", share=True, rows=1)
    assert [r.tokens for r in engine.generate(requests)] == [family.reference(r, MAX_NEW) for r in requests]
    assert engine.prefix_cache.hits == 2  # the second request about image 0, and the second about image 1


def test_a_whole_prompt_beside_a_kept_prefix_runs_in_its_own_pass_and_stays_exact(family, monkeypatch):
    """A request that starts from a kept prefix prefills only the rest of its prompt; a long prompt that shares
    nothing, admitted with it, runs in a pass of its own, so the short rest is not padded to the long prompt."""
    first = family.request(QUESTIONS[0], image_seed=0)
    sibling = family.request(QUESTIONS[1], image_seed=0)
    long = family.request(" ".join(QUESTIONS), image_seed=7)
    cache = prefix_cache.PrefixCache(max_slots=4096)
    capacity = len(long.input_ids)
    prefill(family.target, [first], [first.input_ids], capacity, share=True, cache=cache)

    passes = []
    original = prefill_module._cache

    def recorded(model, runner, cached, features):
        passes.append(sorted(len(c) for c in cached))
        return original(model, runner, cached, features)

    monkeypatch.setattr(prefill_module, "_cache", recorded)
    requests = [sibling, long]
    shared, order, _ = prefill(
        family.target, requests, [r.input_ids for r in requests], capacity, share=True, cache=cache
    )
    assert cache.hits == 1 and order == [0, 1]
    rest = len(sibling.input_ids) - 1 - common_length([sibling.input_ids[:-1], first.input_ids[:-1]])
    assert passes == [[len(long.input_ids) - 1], [rest]]
    alone, good, _ = prefill(family.target, requests, [r.input_ids for r in requests], capacity)
    for row, i in enumerate(order):
        length = len(requests[i].input_ids) - 1
        assert shared.kv_host[row] == alone.kv_host[good.index(i)] == length
        for mine, theirs in zip(shared.cache.keys + shared.cache.values, alone.cache.keys + alone.cache.values):
            torch.testing.assert_close(mine[row, :, :length], theirs[good.index(i), :, :length], rtol=1e-5, atol=1e-5)
