"""Loading targets and drafts the way the pipeline does: from directories and URIs, safetensors only,
with the draft's vocabulary checked against the target's."""

import pytest
import torch

from specvlm.engine import DraftSettings, build_draft
from specvlm.models.build import build_text_lm, build_tokenizer
from specvlm.models.loading import ModelLoadError, load_draft_model, load_target, resolve_model_dir
from specvlm.specdec.decode import DecodeConfig, SpeculativeDecoder
from specvlm.specdec.drafts import ModelDraft, PromptLookupDraft


@pytest.fixture(scope="module")
def saved(family, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    family.target.save_pretrained(root / "target")
    family.processor.save_pretrained(root / "target")
    for kind in ("text_copy", "vlm_noisy"):
        family.drafts[kind].save_pretrained(root / kind)
        family.tokenizer.save_pretrained(root / kind)
    return root


def test_loaded_pair_decodes_like_the_in_memory_pair(family, saved):
    target = load_target(str(saved / "target"), device="cpu", dtype="float32")
    draft = build_draft(DraftSettings("vlm", str(saved / "vlm_noisy"), gamma=3), target)
    assert isinstance(draft, ModelDraft) and not draft.text_only and draft.max_depth == 3
    assert 0.9 < draft.cost_ratio < 1.1  # same architecture as the target
    requests = family.requests(4)
    config = DecodeConfig(max_new_tokens=12, eos_token_ids=(family.tokenizer.eos_token_id,))
    results = SpeculativeDecoder(target.model, draft, config).generate(requests)
    assert [r.tokens for r in results] == [family.reference(r, 12) for r in requests]


def test_text_draft_and_prompt_lookup_load(saved):
    target = load_target(str(saved / "target"), device="cpu", dtype="float32")
    text = build_draft(DraftSettings("text", str(saved / "text_copy")), target)
    assert text.text_only and text.cost_ratio == pytest.approx(1.0)  # the target's own LM, minus the vision tower
    assert isinstance(build_draft(DraftSettings("prompt_lookup"), target), PromptLookupDraft)
    assert build_draft(DraftSettings("none"), target) is None


def test_draft_with_a_different_vocabulary_is_refused(saved, tmp_path):
    target = load_target(str(saved / "target"), device="cpu", dtype="float32")
    other_tokenizer = build_tokenizer(["completely different words for another tokenizer"] * 3, vocab_size=300)
    build_text_lm(other_tokenizer).save_pretrained(tmp_path)
    other_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="does not share the target's vocabulary"):
        build_draft(DraftSettings("text", str(tmp_path)), target)


def test_draft_without_tokenizer_is_refused(saved, family, tmp_path):
    target = load_target(str(saved / "target"), device="cpu", dtype="float32")
    family.drafts["text_random"].save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        build_draft(DraftSettings("text", str(tmp_path)), target)


def test_pickle_weights_are_refused(saved, tmp_path):
    (tmp_path / "config.json").write_text((saved / "target" / "config.json").read_text())
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only safetensors"):
        load_target(str(tmp_path), device="cpu")


def test_unknown_location_says_where_it_looked(tmp_path):
    with pytest.raises(ModelLoadError, match="not a local directory, not a URI"):
        resolve_model_dir("no-such-org/no-such-model-xyz")
    with pytest.raises(ModelLoadError, match="model drafts are text, vlm"):
        load_draft_model("medusa", None, "somewhere")


def test_draft_of_the_wrong_kind_is_refused_before_loading(saved):
    """draft.kind=text with draft.path at a VLM draft (and the reverse) names the mistake and the fix."""
    target = load_target(str(saved / "target"), device="cpu", dtype="float32")
    with pytest.raises(ModelLoadError, match=r"set draft\.kind=vlm"):
        build_draft(DraftSettings("text", str(saved / "vlm_noisy")), target)
    with pytest.raises(ModelLoadError, match=r"set draft\.kind=text"):
        build_draft(DraftSettings("vlm", str(saved / "text_copy")), target)
