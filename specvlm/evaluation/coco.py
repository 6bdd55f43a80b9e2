"""pycocoevalcap's BLEU-4, ROUGE-L and CIDEr-D, computed per sample and combined later, to the same floats.

pycocoevalcap scores a whole set in one object that holds every sample's n-gram counts, and spends most of its
time in numpy scalar calls (a log per n-gram) and a pure-Python LCS table. Re-scoring a large output needs the
work split over processes and streamed, so this computes what each sample contributes:

    BLEU-4   integer counts (test length, closest reference length, n-gram guesses and matches), summed over
             the set and combined as BleuScorer.compute_score does;
    ROUGE-L  the sample's score (the LCS length by bit-parallel dynamic programming, exact), averaged as Rouge does;
    CIDEr-D  the sample's score given the set's document frequencies (`Cider`), averaged as Cider does.

Every floating-point step is pycocoevalcap's own, in its order (numpy's log, sqrt and mean where it uses them), so
the scores equal its scores bit for bit; tests/test_coco_metrics.py checks that on random and tricky sets.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import chain
from typing import NamedTuple

import numpy as np

N = 4  # n-gram orders
SIGMA = 6.0  # CIDEr-D's length penalty
BETA = 1.2  # ROUGE-L's recall weight
_SMALL, _TINY = 1e-9, 1e-15  # BleuScorer's guards against zero division


class Ngrams(NamedTuple):
    """A text's n-grams of orders 1..4 and their counts, in pycocoevalcap's order (order, then position), and its
    length in words: every metric of a text starts from these, so each text is counted once."""

    counts: dict[tuple[str, ...], int]
    length: int


def ngrams(tokens: str) -> Ngrams:
    """precook, with the tuples made by zip and counted by one Counter (C loops), in the same order."""
    words = tokens.split()
    orders = (zip(*(words[i:] for i in range(k))) for k in range(1, N + 1))
    return Ngrams(Counter(chain.from_iterable(orders)), len(words))


# ---------------------------------------------------------------- BLEU-4


def bleu_stats(test: Ngrams, refs: Sequence[Ngrams]) -> tuple[int, ...]:
    """(testlen, reflen, guess 1..4, correct 1..4) of one sample, the closest reference length as Bleu uses."""
    maxcounts: dict[tuple[str, ...], int] = {}
    for ref in refs:
        for ngram, count in ref.counts.items():
            if count > maxcounts.get(ngram, 0):
                maxcounts[ngram] = count
    testlen = test.length
    correct = [0] * N
    for ngram, count in test.counts.items():
        correct[len(ngram) - 1] += min(maxcounts.get(ngram, 0), count)
    reflen = min((abs(ref.length - testlen), ref.length) for ref in refs)[1]
    return (testlen, reflen, *(max(0, testlen - k + 1) for k in range(1, N + 1)), *correct)


def bleu4(total: Sequence[int]) -> float:
    """The corpus BLEU-4 of summed bleu_stats, as BleuScorer.compute_score combines them."""
    testlen, reflen, guess, correct = total[0], total[1], total[2 : 2 + N], total[2 + N :]
    bleu = 1.0
    for k in range(N):
        bleu *= float(correct[k] + _TINY) / (guess[k] + _SMALL)
    score = bleu ** (1.0 / N)
    ratio = (testlen + _TINY) / (reflen + _SMALL)
    return score * math.exp(1 - 1 / ratio) if ratio < 1 else score


# ---------------------------------------------------------------- ROUGE-L


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence length, bit-parallel (Allison and Dix, "A bit-string longest-common-subsequence
    algorithm"): one big-integer step per token of `b` instead of a row of the table."""
    positions: dict[str, int] = {}
    for i, token in enumerate(a):
        positions[token] = positions.get(token, 0) | (1 << i)
    row = (1 << len(a)) - 1  # a 0 bit per matched position, in the lowest len(a) bits
    for token in b:
        matched = row & positions.get(token, 0)
        row = (row + matched) | (row - matched)
    return len(a) - (row & ((1 << len(a)) - 1)).bit_count()


def rouge_l(test: str, refs: Sequence[str]) -> float:
    """Rouge.calc_score: ROUGE-L F (beta 1.2) against the best precision and the best recall over the references."""
    candidate = test.split(" ")
    prec, rec = [], []
    for ref in refs:
        tokens = ref.split(" ")
        lcs = lcs_length(tokens, candidate)
        prec.append(lcs / float(len(candidate)))
        rec.append(lcs / float(len(tokens)))
    prec_max, rec_max = max(prec), max(rec)
    if prec_max != 0 and rec_max != 0:
        return ((1 + BETA**2) * prec_max * rec_max) / float(rec_max + BETA**2 * prec_max)
    return 0.0


def mean(scores: Iterable[float]) -> float:
    """The set's score from its samples', as Rouge and Cider average them (numpy's pairwise sum, in order)."""
    return float(np.mean(np.array(list(scores))))


# ---------------------------------------------------------------- CIDEr-D


def document_ngrams(refs: Sequence[Ngrams]) -> set[tuple[str, ...]]:
    """The n-grams a sample's references hold: each counts once towards the set's document frequency."""
    return set().union(*(ref.counts for ref in refs))


class Cider:
    """CIDEr-D of single samples, given the document frequencies of the whole set (`frequency`: n-gram -> how
    many samples' references hold it, `samples`: how many samples the set has)."""

    def __init__(self, frequency: Counter | dict, samples: int):
        self._frequency = frequency
        self._ref_len = np.log(float(samples))
        self._idf: dict[tuple[str, ...], float] = {}  # the same np.log per n-gram pycocoevalcap takes, once each

    def score(self, test: Ngrams, refs: Sequence[Ngrams]) -> float:
        vec, norm, length = self._vector(test.counts)
        score = np.array([0.0] * N)
        for ref in refs:
            ref_vec, ref_norm, ref_length = self._vector(ref.counts)
            score += self._similarity(vec, ref_vec, norm, ref_norm, length, ref_length)
        score_avg = np.mean(score)
        score_avg /= len(refs)
        score_avg *= 10.0
        return float(score_avg)

    def _vector(self, counts: dict) -> tuple[list[dict], list, int]:
        """counts2vec: tf-idf weights per order, their norms, and the length CIDEr-D compares (its bigram count)."""
        vec: list[dict] = [{} for _ in range(N)]
        norm = [0.0] * N
        length = 0
        idf = self._idf
        for ngram, term_freq in counts.items():
            weight = idf.get(ngram)
            if weight is None:
                weight = idf[ngram] = self._ref_len - np.log(max(1.0, self._frequency.get(ngram, 0.0)))
            n = len(ngram) - 1
            value = vec[n][ngram] = float(term_freq) * weight
            norm[n] += pow(value, 2)
            if n == 1:
                length += term_freq
        return vec, [np.sqrt(x) for x in norm], length

    @staticmethod
    def _similarity(vec_hyp, vec_ref, norm_hyp, norm_ref, length_hyp, length_ref) -> list[float]:
        # Python floats where pycocoevalcap adds into a numpy array: the same IEEE double operations, in its
        # order, without a numpy scalar call per n-gram.
        penalty = np.e ** (-(float(length_hyp - length_ref) ** 2) / (2 * SIGMA**2))
        val = [0.0] * N
        for n in range(N):
            ref = vec_ref[n]
            total = 0.0
            for ngram, weight in vec_hyp[n].items():
                # An n-gram the reference lacks adds min(w, 0) * 0 = 0: skipped.
                if ngram in ref:
                    total += min(weight, ref[ngram]) * ref[ngram]
            if norm_hyp[n] != 0 and norm_ref[n] != 0:
                total /= norm_hyp[n] * norm_ref[n]
            val[n] = total * penalty
        return val
