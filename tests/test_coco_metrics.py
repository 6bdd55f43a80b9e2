"""The per-sample BLEU-4, ROUGE-L and CIDEr-D (specvlm.evaluation.coco) against pycocoevalcap's own scorers,
float for float, on random sets and on the tricky captions."""

from __future__ import annotations

import contextlib
import io
import random
from collections import Counter

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge, my_lcs

from specvlm.evaluation import coco, ptb
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
    refs = {k: [coco.ngrams(r) for r in gts[k]] for k in gts}
    tests = {k: coco.ngrams(res[k][0]) for k in gts}
    frequency = Counter(ngram for key in gts for ngram in coco.document_ngrams(refs[key]))
    cider = coco.Cider(frequency, len(gts))
    stats = [coco.bleu_stats(tests[k], refs[k]) for k in gts]
    return {
        "BLEU-4": coco.bleu4([sum(column) for column in zip(*stats)]),
        "ROUGE-L": coco.mean(coco.rouge_l(res[k][0], gts[k]) for k in gts),
        "CIDEr": coco.mean(cider.score(tests[k], refs[k]) for k in gts),
    }


def _pycocoevalcap(gts: dict, res: dict) -> dict[str, float]:
    with contextlib.redirect_stdout(io.StringIO()):
        bleu = Bleu(4).compute_score(gts, res)[0][3]
    return {
        "BLEU-4": bleu,
        "ROUGE-L": float(Rouge().compute_score(gts, res)[0]),
        "CIDEr": float(Cider().compute_score(gts, res)[0]),
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
