"""Task quality metrics against values worked out by hand on tiny cases."""

from __future__ import annotations

import json

import pytest

from specvlm.evaluation import captions
from specvlm.evaluation.answers import exact_match, normalize_answer, vqa_accuracy
from specvlm.evaluation.captions import caption_scores, tokenize
from specvlm.evaluation.quality import score_rows


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("A circle.", "circle"),  # case, the article, a final period
        ("Two dogs!", "2 dogs"),  # a number word becomes its digit
        ("black/white", "black white"),  # a mark inside a word splits it...
        ("yes, it is", "yes it is"),  # ...and one next to a space is deleted
        ("1,000 people", "1000 people"),  # a digit comma goes, and then every mark is deleted
        ("isnt it 3.5", "isn't it 3.5"),  # contractions get their apostrophe; a decimal point stays
        ("  the  \tanswer\n", "answer"),
    ],
)
def test_vqa_normalisation(raw, normalised):
    assert normalize_answer(raw) == normalised


@pytest.mark.parametrize(
    "agreeing, accuracy",
    [
        # With k of 10 humans agreeing, each of the 10 leave-one-out sets scores min(matches / 3, 1):
        # the k sets without an agreeing human have k - 1 matches, the 10 - k others have k.
        (0, 0.0),
        (1, (1 * 0 + 9 * (1 / 3)) / 10),  # 0.3
        (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 0.6
        (3, (3 * (2 / 3) + 7 * 1) / 10),  # 0.9
        (4, 1.0),
        (9, 1.0),
    ],
)
def test_vqa_accuracy_with_ten_answers(agreeing, accuracy):
    # The prediction and the agreeing humans write it differently; with humans disagreeing, both conventions
    # normalise both sides, which makes them one answer.
    humans = ["Two."] * agreeing + ["three"] * (10 - agreeing)
    assert vqa_accuracy("2", humans) == pytest.approx(accuracy)
    assert vqa_accuracy("the circle.", ["A circle"] * agreeing + ["square"] * (10 - agreeing)) == pytest.approx(
        accuracy
    )


def test_vqa_conventions_when_all_ten_humans_agree():
    # The official script compares the prediction as written with the humans' shared string; lmms-eval first
    # runs EvalAI's processor on the prediction (lowercase, punctuation, number words, articles).
    assert vqa_accuracy("yes", ["yes"] * 10, convention="official") == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10, convention="official") == 0.0
    assert vqa_accuracy("Yes.", ["yes"] * 10, convention="lmms-eval") == 1.0
    assert vqa_accuracy("Two", ["2"] * 10, convention="lmms-eval") == 1.0
    assert vqa_accuracy("2", ["Two."] * 10, convention="lmms-eval") == 0.0  # the humans' strings stay raw
    with pytest.raises(ValueError, match="VQA convention"):
        vqa_accuracy("yes", ["yes"] * 10, convention="nope")


def test_exact_match_is_normalised_and_takes_any_reference():
    assert exact_match("A Circle.", ["circle"]) == 1.0
    assert exact_match("at the top left.", ["top left", "at the top left"]) == 1.0
    assert exact_match("top left", ["at the top left"]) == 0.0  # "at top left" is another answer


# Two images, one reference each. Hypothesis 1 is its reference; hypothesis 2 has one word wrong.
TOY_PREDICTIONS = {1: "A red circle on white.", 2: "a blue circle on black"}
TOY_REFERENCES = {1: ["a red circle on white"], 2: ["A blue square on black."]}


def test_bleu_on_a_two_image_toy_set():
    # Corpus BLEU, closest reference length (5 + 5 = 10 tokens both: brevity penalty 1). Clipped n-gram matches:
    # 1-grams 5/5 + 4/5 = 9/10; 2-grams 4/4 + 2/4 ("a blue", "on black") = 6/8; 3-grams 3/3 + 0/3 = 3/6;
    # 4-grams 2/2 + 0/2 = 2/4. BLEU-4 = (9/10 * 6/8 * 3/6 * 2/4) ** (1/4).
    scores = caption_scores(TOY_PREDICTIONS, TOY_REFERENCES, meteor=False).scores
    assert scores["BLEU-4"] == pytest.approx((0.9 * 0.75 * 0.5 * 0.5) ** 0.25, rel=1e-6)


def test_cider_on_a_two_image_toy_set():
    # CIDEr-D: n-gram weights tf * (log(#images) - log(df)); "a" and "on" are in both images' references (df 2,
    # weight 0), every other n-gram has weight log 2 (an n-gram no reference has counts df 1). Image 1 equals its
    # reference: cosine 1 for n = 1..4, so 10 * mean(1, 1, 1, 1) = 10. Image 2, with L = log 2:
    #   1-grams {blue, circle, black} . {blue, square, black}: 2L^2 / (sqrt(3)L * sqrt(3)L) = 2/3
    #   2-grams {a blue, blue circle, circle on, on black} . {a blue, blue square, square on, on black}: 2/4
    #   3-grams and 4-grams share nothing: 0. Same length, so no length penalty: 10 * (2/3 + 1/2) / 4 = 35/12.
    # Corpus CIDEr: (10 + 35/12) / 2 = 155/24.
    scores = caption_scores(TOY_PREDICTIONS, TOY_REFERENCES, meteor=False).scores
    assert scores["CIDEr"] == pytest.approx(155 / 24, rel=1e-9)


def test_rouge_l_on_a_two_image_toy_set():
    # Image 1: LCS 5 of 5. Image 2: LCS "a blue on black" = 4 of 5 both ways, F = 0.8. Mean 0.9.
    assert caption_scores(TOY_PREDICTIONS, TOY_REFERENCES, meteor=False).scores["ROUGE-L"] == pytest.approx(0.9)


def test_bleu_clips_against_the_best_of_several_references():
    # "the cat the cat": unigram "the" counts at most twice only where one reference has it twice.
    one = caption_scores({1: "the cat the cat"}, {1: ["the cat"]}, meteor=False).scores["BLEU-4"]
    several = caption_scores({1: "the cat the cat"}, {1: ["the cat", "the cat sat on the cat"]}, meteor=False)
    assert one < several.scores["BLEU-4"]


def test_tokenizer_follows_penn_treebank_and_drops_punctuation():
    assert tokenize("A man's hat (red). It isn't big!") == "a man 's hat red it is n't big"


def test_meteor_is_left_out_with_a_note_without_java(monkeypatch):
    monkeypatch.setattr(captions.shutil, "which", lambda name: None)
    result = caption_scores(TOY_PREDICTIONS, TOY_REFERENCES)
    assert "METEOR" not in result.scores and set(result.scores) == {"BLEU-4", "ROUGE-L", "CIDEr"}
    assert any("METEOR left out" in note and "java" in note for note in result.notes)


@pytest.mark.skipif(not captions.meteor_available(), reason="METEOR needs Java")
def test_meteor_where_java_is_ranks_an_exact_caption_above_a_wrong_one():
    exact = caption_scores({1: "a red circle on white"}, {1: ["a red circle on white"]}).scores["METEOR"]
    wrong = caption_scores({1: "a blue square on black"}, {1: ["a red circle on white"]}).scores["METEOR"]
    assert exact > 0.9 > 0.5 > wrong


def _row(key, task, text, reference=None, references=None, meta=None, error=None):
    return {
        "shard_id": "s",
        "key": key,
        "task": task,
        "text": text,
        "reference": reference,
        "references": references,
        "meta": json.dumps(meta) if meta else None,
        "error": error,
    }


def test_vqa_rows_take_vqa_accuracy_with_ten_answers_and_exact_match_otherwise_per_slice():
    rows = [
        _row("1", "vqa", "two", "2", ["2"] * 3 + ["3"] * 7, {"answer_type": "number"}),  # 0.9
        _row("2", "vqa", "red.", "red", ["red"] * 10, {"answer_type": "other"}),  # 1.0
        _row("3", "vqa", "a square", "circle", None, {"answer_type": "other"}),  # exact match 0
        _row("4", "vqa", "circle", "circle", None, {"answer_type": "other"}),  # exact match 1
        _row("5", "vqa", None, "circle", error="decoding failed"),
        _row("6", "vqa", "blue", None),  # nothing to score against
    ]
    quality = score_rows(rows, ["answer_type", "missing_field"])
    assert quality["metrics"] == {"VQA accuracy": pytest.approx(0.95), "exact match": 0.5}
    assert (quality["samples"], quality["errors"], quality["unscored"]) == (6, 1, 1)
    assert list(quality["slices"]) == ["answer_type"]
    by_type = quality["slices"]["answer_type"]
    assert by_type["number"]["metrics"] == {"VQA accuracy": pytest.approx(0.9)}
    assert by_type["other"]["metrics"] == {"VQA accuracy": 1.0, "exact match": 0.5}


def test_multiple_choice_accuracy_counts_unparsed_answers_as_wrong():
    rows = [
        _row("1", "mc", "it is red. the answer is (b).", "b", meta={"has_image": True}),
        _row("2", "mc", "the answer is a.", "b", meta={"has_image": True}),
        _row("3", "mc", "i cannot tell", "a", meta={"has_image": False}),
    ]
    quality = score_rows(rows, ["has_image"])
    assert quality["metrics"] == {"accuracy": pytest.approx(1 / 3), "unparsed": 1}
    assert quality["slices"]["has_image"]["False"]["metrics"] == {"accuracy": 0.0, "unparsed": 1}


def test_caption_rows_score_against_every_reference():
    rows = [
        _row(str(k), "caption", TOY_PREDICTIONS[k], TOY_REFERENCES[k][0], TOY_REFERENCES[k]) for k in TOY_PREDICTIONS
    ]
    quality = score_rows(rows, meteor=False)
    assert quality["metrics"]["CIDEr"] == pytest.approx(155 / 24)
    assert quality["notes"] == ["METEOR not computed (turned off)"]
