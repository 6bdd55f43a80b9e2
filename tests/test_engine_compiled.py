"""The decode step as a GPU runs it: compiled (torch.compile, fullgraph), on bucketed shapes, one host read per
step. Each must leave the output exactly what the target's own decoding gives."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from specvlm.specdec.decode import DecodeConfig, SpeculativeDecoder
from specvlm.specdec.sampling import SamplingParams
from specvlm.specdec.tree import TreeSettings
from tests.test_engine_sampling import PARAMS, chi_square_p, exact_distribution, sample_sequences

TREE = TreeSettings(topk=2, beam=2, max_nodes=6)
# (draft kind, tree settings or None for a chain)
DRAFTS = {
    "none": ("none", None),
    "chain": ("vlm_noisy", None),
    "tree": ("vlm_noisy", TREE),
    "lookup": ("prompt_lookup", None),
}


@pytest.fixture(scope="module")
def mixed(family):
    """Requests of different prompts and output limits (1 to 18 tokens): rows finish and others join at once."""
    requests = family.requests(10)
    for i, request in enumerate(requests):
        request.max_new_tokens = 1 + (i * 7) % 18
    return requests, [family.reference(r, r.max_new_tokens) for r in requests]


def decoder(family, draft: str, rows: int, **config) -> SpeculativeDecoder:
    kind, tree = DRAFTS[draft]
    settings = DecodeConfig(
        max_new_tokens=24, eos_token_ids=(family.tokenizer.eos_token_id,), max_rows=rows, adaptive=False, **config
    )
    return SpeculativeDecoder(family.target, family.draft(kind, gamma=3, tree=tree), settings)


@pytest.mark.parametrize("draft", list(DRAFTS))
@pytest.mark.parametrize("rows", [1, 3, 10])
def test_compiled_decoding_matches_target_generate(family, mixed, draft, rows):
    """Greedy, token by token, with rows joining as others finish (rows < requests) and all at once."""
    requests, expected = mixed
    engine = decoder(family, draft, rows, compile=True)
    assert [r.tokens for r in engine.generate(requests)] == expected
    report = engine.describe()["compile"]
    assert report["fell_back_to_eager"] is None, report


def test_compiled_forwards_are_whole_graphs_and_do_not_recompile(family, mixed):
    """fullgraph=True turns any graph break into an error, which would show as a fall-back to eager; after the
    warm-up, a job of changing row counts, windows and lengths compiles nothing new."""
    requests, _ = mixed
    warm = decoder(family, "chain", 4, compile=True)
    assert warm.describe()["compile"]["fell_back_to_eager"] is None
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    engine = decoder(family, "chain", 4, compile=True)
    engine.generate(requests)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert engine.describe()["compile"]["fell_back_to_eager"] is None


def test_compiled_sampling_follows_the_target_distribution(family, monkeypatch):
    import tests.test_engine_sampling as sampling_tests

    request = family.request("what is in the picture?", image_seed=3)
    exact = exact_distribution(family, request, PARAMS, sampling_tests.LENGTH)
    real = DecodeConfig

    def compiled_config(**kwargs):
        return real(**kwargs, compile=True)

    monkeypatch.setattr(sampling_tests, "DecodeConfig", compiled_config)
    samples = sample_sequences(family, "vlm_noisy", request, PARAMS, 3)
    assert chi_square_p(samples, exact) > 1e-3


@pytest.mark.parametrize("draft", list(DRAFTS))
def test_static_shape_buckets_match_target_generate(family, mixed, draft):
    """Rows, windows and read lengths rounded up to buckets (as CUDA graphs need): padding changes nothing."""
    requests, expected = mixed
    engine = decoder(family, draft, 5, static_shapes=True)
    assert engine.shapes.static
    assert [r.tokens for r in engine.generate(requests)] == expected


class HostReads(TorchFunctionMode):
    """Counts the tensor calls that bring device data to the host (each a full sync on a GPU). numpy() is not
    one: it takes a tensor already on the host (a device tensor needs cpu() first, which is counted)."""

    READS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "nonzero"})

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def reads_per_step(engine: SpeculativeDecoder, requests) -> list[int]:
    counts = []
    step = engine._step

    def counted(state):
        with HostReads() as reads:
            out = step(state)
        counts.append(reads.count)
        return out

    engine._step = counted
    engine.generate(requests)
    return counts


@pytest.mark.parametrize("draft", list(DRAFTS))
@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.8, top_k=20)])
def test_a_decode_step_reads_the_device_once(family, mixed, draft, sampling):
    requests, _ = mixed
    engine = decoder(family, draft, 4, sampling=sampling)
    counts = reads_per_step(engine, requests)
    assert len(counts) > 5
    assert max(counts) == 1, counts  # the step's one read-back: accepted counts, tokens, finished flags


def test_the_read_counter_sees_a_read(family, mixed, monkeypatch):
    """The counter above is only evidence if it catches a read: add one to the step and it must see two."""
    requests, _ = mixed
    engine = decoder(family, "chain", 4)
    verify = engine._verify

    def reading(state, proposal):
        logits = verify(state, proposal)
        logits.sum().item()
        return logits

    monkeypatch.setattr(engine, "_verify", reading)
    assert max(reads_per_step(engine, requests)) == 2
