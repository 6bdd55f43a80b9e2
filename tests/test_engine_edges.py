"""Edge cases of the decode loop and per-row input errors, always checked against the target's own greedy output."""

import pytest
import torch

from specvlm.specdec.requests import Request
from tests.test_engine_greedy import DRAFTS, decode

MAX_NEW = 16


@pytest.fixture(scope="module")
def requests(family):
    return family.requests(8)


@pytest.mark.parametrize("draft", DRAFTS)
def test_max_new_tokens_1(family, requests, draft):
    results = decode(family, draft, 3, requests, max_new=1)
    for request, result in zip(requests, results):
        assert result.tokens == family.reference(request, 1)
        assert result.stop_reason == "max_tokens" and result.metrics.target_calls == 1


@pytest.mark.parametrize("draft", DRAFTS)
def test_gamma_larger_than_tokens_left(family, requests, draft):
    results = decode(family, draft, 5, requests, max_new=2)
    for request, result in zip(requests, results):
        assert result.tokens == family.reference(request, 2)
        assert result.metrics.proposed_tokens <= 1  # only one draft token can ever be used
        assert result.metrics.draft_calls <= 1  # and no draft pass is run for tokens past the budget


@pytest.mark.parametrize("draft", DRAFTS)
def test_eos_as_first_token(family, requests, draft):
    eos = family.reference(requests[0], 1)[0]
    result = decode(family, draft, 3, requests[:1], eos=eos)[0]
    assert result.tokens == [eos] and result.stop_reason == "eos"
    assert result.metrics.new_tokens == 1


@pytest.mark.parametrize("draft", ["vlm_self", "vlm_noisy"])
def test_draft_proposing_eos_stops_there(family, requests, draft):
    """With a draft that knows the target, EOS arrives inside an accepted proposal, not as the target's token."""
    eos = family.reference(requests[0], MAX_NEW)[6]
    result = decode(family, draft, 5, requests[:1], max_new=MAX_NEW, eos=eos)[0]
    expected = family.reference(requests[0], MAX_NEW, eos=eos)
    assert expected[-1] == eos and result.tokens == expected and result.stop_reason == "eos"


@pytest.mark.parametrize("draft", DRAFTS)
def test_rows_finishing_at_different_steps(family, requests, draft):
    # A token that several rows produce at different depths serves as EOS.
    refs = [family.reference(r, MAX_NEW) for r in requests]
    counts = {}
    for ref in refs:
        for pos, tok in enumerate(ref):
            counts.setdefault(tok, set()).add(pos)
    eos = max(counts, key=lambda t: len(counts[t]))
    expected = [family.reference(r, MAX_NEW, eos=eos) for r in requests]
    assert len({len(e) for e in expected}) > 2, "test setup: rows should stop at several different lengths"
    results = decode(family, draft, 3, requests, max_new=MAX_NEW, eos=eos)
    assert [r.tokens for r in results] == expected
    assert [r.stop_reason for r in results] == ["eos" if e[-1] == eos else "max_tokens" for e in expected]


def test_finished_rows_leave_the_batch(family, requests):
    eos = family.reference(requests[2], MAX_NEW)[1]
    rows_per_pass = []
    forward = family.target.forward

    def counting_forward(*args, **kwargs):
        if "input_ids" in kwargs:  # verification passes only (a prefill passes embeddings, images merged)
            rows_per_pass.append(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    family.target.forward = counting_forward
    try:
        results = decode(family, "vlm_noisy", 3, requests, max_new=MAX_NEW, eos=eos)
    finally:
        del family.target.forward
    finished_early = sum(len(r.tokens) < MAX_NEW for r in results)
    assert finished_early >= 1
    assert rows_per_pass == sorted(rows_per_pass, reverse=True)
    assert rows_per_pass[0] == len(requests) and rows_per_pass[-1] < len(requests)


def test_empty_question_and_text_only_prompt(family):
    empty = family.request("")
    text_only = Request(family.tokenizer("USER: describe a red circle ASSISTANT:").input_ids)
    results = decode(family, "vlm_noisy", 3, [empty, text_only])
    assert results[0].tokens == family.reference(empty, 24)
    assert results[1].tokens == family.reference(text_only, 24)


def _bad_requests(family):
    good = family.request("what is this?")
    last_image_token = max(i for i, t in enumerate(good.input_ids) if t == family.image_token_id)
    return {
        "the prompt has": Request(good.input_ids, None),  # placeholders, no image
        "no image placeholder": Request(family.tokenizer("USER: hi ASSISTANT:").input_ids, good.pixel_values),
        "pixel_values has shape": Request(good.input_ids, torch.zeros(1, 3, 40, 40)),
        "expects": Request(family.tokenizer("USER: <image>\nhi ASSISTANT:").input_ids, good.pixel_values),
        "empty prompt": Request([], None),
        "outside the model's vocabulary": Request([1, 5, 10**6, 7], None),
        "ends with an image placeholder": Request(good.input_ids[: last_image_token + 1], good.pixel_values),
    }


@pytest.mark.parametrize("draft", ["text_copy", "vlm_noisy", "prompt_lookup"])
def test_bad_rows_get_errors_and_the_rest_of_the_batch_is_unaffected(family, requests, draft):
    bad = _bad_requests(family)
    batch = [requests[0], *bad.values(), requests[1]]
    results = decode(family, draft, 3, batch)
    for message, result in zip(bad, results[1:-1]):
        assert result.stop_reason == "error" and message in result.error and result.tokens == []
    assert results[0].tokens == family.reference(requests[0], 24)
    assert results[-1].tokens == family.reference(requests[1], 24)
