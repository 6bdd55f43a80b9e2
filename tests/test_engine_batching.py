"""Continuous batching stays lossless: requests that join the running batch at any step, with their own lengths,
decode exactly as the target alone would; memory stays within the token budget; the engine service isolates a
request that crashes the model."""

import pytest

from specvlm.specdec.decode import DecodeConfig, SpeculativeDecoder
from specvlm.specdec.requests import Request, Result
from specvlm.specdec.sampling import SamplingParams
from specvlm.specdec.service import SNAPSHOT_EVERY, EngineService

DRAFTS = ["none", "vlm_noisy", "text_copy", "prompt_lookup"]


@pytest.fixture(scope="module")
def mixed(family):
    """Requests of different prompts and output limits (1 to 18 tokens), as short answers mixed with captions."""
    requests = []
    for i, request in enumerate(family.requests(10)):
        request.max_new_tokens = 1 + (i * 7) % 18
        requests.append(request)
    return requests, [family.reference(r, r.max_new_tokens) for r in requests]


GREEDY = SamplingParams()


def decoder(family, draft="vlm_noisy", rows=3, adaptive=False, sampling=GREEDY, **config):
    config = DecodeConfig(
        max_new_tokens=24,
        eos_token_ids=(family.tokenizer.eos_token_id,),
        max_rows=rows,
        adaptive=adaptive,
        sampling=sampling,
        **config,
    )
    return SpeculativeDecoder(family.target, family.draft(draft, gamma=3), config)


@pytest.mark.parametrize("draft", DRAFTS)
@pytest.mark.parametrize("rows", [1, 3])
def test_requests_joining_as_rows_finish_match_target_generate(family, mixed, draft, rows):
    requests, expected = mixed
    results = decoder(family, draft, rows).generate(requests)
    assert [r.tokens for r in results] == expected
    for request, result in zip(requests, results):
        assert result.stop_reason == "max_tokens" and result.metrics.new_tokens == request.max_new_tokens


@pytest.mark.parametrize("draft", ["vlm_noisy", "prompt_lookup"])
def test_a_request_joining_at_any_step_decodes_as_it_would_alone(family, mixed, draft):
    requests, expected = mixed
    for join_at in range(0, 9):
        engine = decoder(family, draft, rows=4)
        early = [engine.submit(r) for r in requests[:4]]
        results = {}
        for _ in range(join_at):
            results.update(engine.step())
        late = engine.submit(requests[5])
        while not {*early, late} <= results.keys():
            results.update(engine.step())
        assert results[late].tokens == expected[5], f"joined at step {join_at}"
        assert [results[i].tokens for i in early] == expected[:4]


def test_a_sampled_request_does_not_depend_on_its_batch_or_when_it_joined(family):
    sampling = SamplingParams(temperature=0.9, top_p=0.95)
    probe = family.request("fox", seed=11)
    alone = decoder(family, rows=1, sampling=sampling).generate([probe])[0].tokens
    others = [family.request(q, seed=s, image_seed=s) for s, q in enumerate(["a", "b c", "what is this?", "d"])]
    for join_at in (0, 2, 5):
        engine = decoder(family, rows=3, sampling=sampling)
        for request in others:
            engine.submit(request)
        results = {}
        for _ in range(join_at):
            results.update(engine.step())
        rid = engine.submit(probe)
        while rid not in results:
            results.update(engine.step())
        assert results[rid].tokens == alone, f"joined at step {join_at}"


def test_the_adaptive_controller_keeps_output_identical(family, mixed):
    requests, expected = mixed
    for rows in (1, 4):
        engine = decoder(family, "vlm_noisy", rows, adaptive=True)
        assert [r.tokens for r in engine.generate(requests)] == expected
        assert sum(engine.controller.depths.values()) > 0


def test_running_batch_stays_within_the_token_budget(family):
    requests = family.requests(8) + [Request(family.request("x" * 60).input_ids)]  # one much longer prompt
    budget = 400
    engine = decoder(family, rows=8, max_batch_tokens=budget)
    for r in requests:
        engine.submit(r)
    seen = []
    while engine.busy:
        engine.step()
        state = engine.state
        seen.append(state.n)
        live = [x for x in state.live[: state.n] if x is not None]
        assert state.rows * state.capacity <= budget or len(live) == 1
    assert max(seen) > 1, "several rows ran together where they fit"


def test_max_new_tokens_is_per_request_and_positions_cut_outputs_short(family):
    """A request may ask for its own output length; where the model's positions end first, the output stops
    there with its own stop reason instead of failing."""
    positions = family.target.config.text_config.max_position_embeddings
    request = family.request("what is this?")
    room = positions - len(request.input_ids)
    request.max_new_tokens = room + 50
    result = decoder(family, rows=1).generate([request])[0]
    assert result.error is None and result.stop_reason == "max_positions"
    assert len(result.tokens) == room
    assert result.tokens == family.reference(request, room, eos=-1)[: len(result.tokens)]


def test_eos_defaults_to_the_targets_generation_config(family):
    request = family.request("what is this?")
    eos = family.reference(request, 12)[4]
    family.target.generation_config.eos_token_id = eos
    try:
        engine = SpeculativeDecoder(family.target, None, DecodeConfig(max_new_tokens=12))
        (result,) = engine.generate([request])
    finally:
        family.target.generation_config.eos_token_id = family.tokenizer.eos_token_id
    assert result.stop_reason == "eos" and result.tokens[-1] == eos and len(result.tokens) <= 5


class _PoisonDecoder:
    """Stands in for SpeculativeDecoder: any step or batch holding request seed 666 fails, like a model that
    crashes on one input."""

    calls = 0

    def __init__(self):
        self.queue = {}
        self.next_id = 0

    @property
    def busy(self):
        return bool(self.queue)

    def submit(self, request):
        self.next_id += 1
        self.queue[self.next_id] = request
        return self.next_id

    def step(self):
        _PoisonDecoder.calls += 1
        if any(r.seed == 666 for r in self.queue.values()):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        done, self.queue = self.queue, {}
        return [(rid, Result(tokens=[r.seed], stop_reason="max_tokens")) for rid, r in done.items()]

    def generate(self, requests):
        ids = [self.submit(r) for r in requests]
        results = dict(self.step())
        return [results[i] for i in ids]

    def describe(self):
        return {}


def test_a_request_that_crashes_the_model_is_isolated_and_the_rest_decode():
    _PoisonDecoder.calls = 0
    service = EngineService(_PoisonDecoder)
    futures = [service.submit(Request([1, 2], seed=s)) for s in (1, 2, 3, 666, 5, 6, 7, 8)]
    results = [f.result(timeout=30) for f in futures]
    service.close()
    assert [r.tokens for r in results] == [[1], [2], [3], [], [5], [6], [7], [8]]
    assert results[3].stop_reason == "error" and "illegal memory access" in results[3].error
    assert service.isolations >= 1
    assert _PoisonDecoder.calls <= 2 * 8  # halves, not the whole batch again per row


def test_the_service_reports_a_dead_engine_instead_of_hanging():
    class Broken(_PoisonDecoder):
        def submit(self, request):
            raise MemoryError("out of memory while queueing")

    service = EngineService(Broken)
    future = service.submit(Request([1], seed=1))
    with pytest.raises(MemoryError):
        future.result(timeout=30)
    service.thread.join(timeout=30)
    with pytest.raises(MemoryError):
        service.submit(Request([1], seed=2)).result(timeout=1)


def test_engine_reuses_rows_without_growing_the_cache(family, mixed):
    requests, _ = mixed
    engine = decoder(family, rows=2)
    engine.generate(requests[:2])
    capacity, rows = engine.state.capacity, engine.state.rows
    engine.generate(requests[2:6])
    assert (engine.state.capacity, engine.state.rows) == (capacity, rows)


@pytest.mark.parametrize("draft", ["vlm_noisy", "prompt_lookup"])
def test_rows_moved_by_compaction_leave_nothing_behind_in_the_draft(family, mixed, draft):
    """Rows that finish early leave holes; compaction moves rows from the tail into them. A request that later
    takes a vacated tail row while the draft is not admitting rows must not inherit the old row's draft state
    (it would grow past the draft's buffer), and every output stays the target's own."""
    requests, expected = mixed
    engine = decoder(family, draft, rows=4)
    results, ids = {}, [engine.submit(r) for r in requests[:4]]
    while len(results) < 2:  # some rows finished: holes, then compaction
        results.update(engine.step())
    engine.controller.wants_drafting = False  # joining rows are decoded without the draft
    ids += [engine.submit(r) for r in requests[4:]]
    while not set(ids) <= results.keys():
        results.update(engine.step())
        state = engine.state
        assert not state.drafted[state.n :].any(), "a row beyond the batch is still marked as drafted"
    assert [results[i].tokens for i in ids] == expected


def test_the_service_snapshot_covers_every_step_once_its_rows_are_done(family, mixed):
    """A job's manifest reports the operating point its decode actors read after their rows: the snapshot must
    hold the whole run then, not its first step only (runs shorter than SNAPSHOT_EVERY steps had only that)."""
    requests, _ = mixed
    service = EngineService(lambda: decoder(family, rows=3, adaptive=True))
    results = [f.result(timeout=300) for f in [service.submit(r) for r in requests]]
    snapshot = service.describe()
    service.close()
    assert all(r.error is None for r in results)
    assert 1 < service.steps < SNAPSHOT_EVERY
    assert snapshot["controller"] == service.decoder.describe()["controller"]  # as of the last step
    assert sum(snapshot["controller"]["depth_chosen_steps"].values()) > 1
