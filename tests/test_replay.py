"""The replay draft replays each request's own recorded continuation, also where prompts differ only by image."""

from specvlm.evaluation.replay import ReplayDraft, record_scripts
from specvlm.specdec.decode import DecodeConfig, SpeculativeDecoder
from specvlm.specdec.metrics import pool

MAX_NEW = 16


def test_uncorrupted_replay_is_fully_accepted_when_images_share_one_prompt(family):
    # One question over four images: the prompt ids are equal, as every caption request's are.
    requests = [family.request("describe", image_seed=i) for i in range(4)]
    assert len({tuple(r.input_ids) for r in requests}) == 1
    config = DecodeConfig(max_new_tokens=MAX_NEW, eos_token_ids=(-1,), max_rows=2, adaptive=False)
    reference = [r.tokens for r in SpeculativeDecoder(family.target, None, config).generate(requests)]
    assert len({tuple(t) for t in reference}) > 1, "the images must lead to different continuations"
    vocab = family.target.get_output_embeddings().weight.shape[0]
    draft = ReplayDraft(
        record_scripts(requests, reference), error_rate=0.0, target_vocab=vocab, device=family.target.device
    )
    results = SpeculativeDecoder(family.target, draft, config).generate(requests)
    assert [r.tokens for r in results] == reference
    assert pool(r.metrics for r in results).acceptance_rate == 1.0
