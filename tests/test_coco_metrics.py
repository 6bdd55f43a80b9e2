"""The per-sample BLEU-4, ROUGE-L and CIDEr-D (specvlm.evaluation.coco) against pycocoevalcap's own scorers,
float for float, on random sets and on the tricky captions."""

from __future__ import annotations

import contextlib
import io
import random

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge, my_lcs

from specvlm.evaluation import coco, ptb
from specvlm.evaluation.captions import corpus_of
from tests.test_caption_tokens import PREDICTIONS, REFERENCES

VOCABULARY = "a an the red blue dog cat sits on of in with man woman table two -lrb- -rrb- mr. 's"
WORDS = VOCABULARY.split()


def _random_set(seed: int, samples: int) -> tuple[dict, dict]:
    rng = random.Random(seed)

    def sentence():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 14)))

    gts = {i: [sentence() for _ in range(rng.randint(1, 6))] for i in range(samples)}
    res = {i: [rng.choice([sentence(), gts[i][0]])] for i in range(samples)}  # some copy a reference
    return gts, res


def _ours(gts: dict, res: dict) -> dict[str, float]:
    keys = list(gts)
    corpus, samples, texts = corpus_of([res[k][0] for k in keys], [gts[k] for k in keys])
    frequency = coco.document_frequencies(corpus, samples, [np.arange(len(keys))])[0]
    stats = coco.bleu_stats(corpus, samples)
    return {
        "BLEU-4": coco.bleu4([sum(column) for column in zip(*stats)]),
        "ROUGE-L": coco.mean(coco.rouge_ls(corpus, samples, texts)),
        "CIDEr": coco.mean(coco.ciders(corpus, samples, frequency, len(keys))),
        "CIDEr per sample": coco.ciders(corpus, samples, frequency, len(keys)),
        "ROUGE-L per sample": coco.rouge_ls(corpus, samples, texts),
    }


def _pycocoevalcap(gts: dict, res: dict) -> dict[str, float]:
    with contextlib.redirect_stdout(io.StringIO()):
        bleu = Bleu(4).compute_score(gts, res)[0][3]
    rouge, rouges = Rouge().compute_score(gts, res)
    cider, ciders = Cider().compute_score(gts, res)
    return {
        "BLEU-4": bleu,
        "ROUGE-L": float(rouge),
        "CIDEr": float(cider),
        "CIDEr per sample": [float(c) for c in ciders],
        "ROUGE-L per sample": [float(r) for r in rouges],
    }


@pytest.mark.parametrize("seed, samples", [(0, 1), (1, 2), (2, 40), (3, 300)])
def test_scores_equal_pycocoevalcap_to_the_last_bit_on_random_sets(seed, samples):
    gts, res = _random_set(seed, samples)
    assert _ours(gts, res) == _pycocoevalcap(gts, res)


def test_scores_equal_pycocoevalcap_to_the_last_bit_on_the_tricky_captions():
    tokens = ptb.tokenize_texts(
        [*PREDICTIONS.values(), *(r for refs in REFERENCES.values() for r in refs)], "ptb-python"
    )
    gts = {k: [tokens[r] for r in refs] for k, refs in REFERENCES.items()}
    res = {k: [tokens[PREDICTIONS[k]]] for k in REFERENCES}
    assert _ours(gts, res) == _pycocoevalcap(gts, res)


def test_bit_parallel_lcs_equals_the_table():
    rng = random.Random(5)
    for _ in range(500):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 20))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 20))]
        assert coco.lcs_length(a, b) == my_lcs(a, b)


def test_scores_equal_pycocoevalcap_on_long_repetitive_texts_scored_in_several_blocks(monkeypatch):
    # Repeated words (counts above 1), dozens of n-grams per order, and samples spread over many blocks of the
    # arrays: every fold of CIDEr-D in pycocoevalcap's order.
    monkeypatch.setattr(coco, "_BLOCK", 64)
    rng = random.Random(9)
    words = [f"w{i}" for i in range(400)]
    gts = {
        i: [" ".join(rng.choice(words[: rng.randint(5, 400)]) for _ in range(rng.randint(1, 60))) for _ in range(6)]
        for i in range(300)
    }
    res = {i: [" ".join(rng.choice(words[:50]) for _ in range(rng.randint(1, 80)))] for i in range(300)}
    assert _ours(gts, res) == _pycocoevalcap(gts, res)


def test_rouge_l_at_the_64_word_limit_of_its_bit_masks_and_on_empty_texts():
    # Candidates of 63, 64 and 65 words (the last by the big-integer path), repeated words, and an empty text
    # on either side: Rouge's own numbers, sample by sample.
    rng = random.Random(4)
    tests = {i: " ".join(rng.choice("abcdefgh") for _ in range(n)) for i, n in enumerate([63, 64, 65, 64, 1, 2])}
    tests[6] = ""
    refs = {i: [" ".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 90))) for _ in range(3)] for i in tests}
    refs[5] = ["", "a b"]
    corpus, samples, texts = corpus_of(list(tests.values()), list(refs.values()))
    expected = Rouge().compute_score(refs, {i: [t] for i, t in tests.items()})[1]
    assert coco.rouge_ls(corpus, samples, texts) == [float(r) for r in expected]
