"""pycocoevalcap's BLEU-4, ROUGE-L and CIDEr-D, computed per sample and combined later, to the same floats.

pycocoevalcap scores a whole set in one object that holds every sample's n-gram counts, and spends most of its
time in numpy scalar calls (a log per n-gram), Python loops over n-grams and a pure-Python LCS table. Re-scoring
a large output needs the work split over processes and streamed, so this computes what each sample contributes:

    BLEU-4   integer counts (test length, closest reference length, n-gram guesses and matches), summed over
             the set and combined as BleuScorer.compute_score does;
    ROUGE-L  the sample's score (the LCS length by bit-parallel dynamic programming, exact), averaged as Rouge does;
    CIDEr-D  the sample's score given the set's document frequencies (`ciders`), averaged as Cider does.

The texts of a set are counted together, once each (`Corpus`): their n-grams become integer ids and the counts
arrays, so BLEU's clipped counts, the document frequencies and CIDEr-D's tf-idf vectors and cosines are array
operations over all samples at once rather than Python loops per n-gram. Every floating-point step is still
pycocoevalcap's own, one IEEE operation for one and in its order: products, minima, quotients and square roots
elementwise; every sum a fold from 0.0 in pycocoevalcap's order (`_folds`), never numpy's pairwise sums; squares
by the C library's pow, as pycocoevalcap takes them (pow(x, 2) differs from x * x in the last bit for a few
values in a thousand); logs by numpy, one call per distinct document frequency. So the scores equal its scores
bit for bit; tests/test_coco_metrics.py checks that on random and tricky sets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain, repeat

import numpy as np

N = 4  # n-gram orders
SIGMA = 6.0  # CIDEr-D's length penalty
BETA = 1.2  # ROUGE-L's recall weight
_SMALL, _TINY = 1e-9, 1e-15  # BleuScorer's guards against zero division
_BLOCK = 4096  # samples whose n-gram comparisons are arrays at once: bounds their memory to tens of MB


class _Numbering(dict):
    """key -> a number, 0, 1, ... in order of first sight."""

    def __missing__(self, key) -> int:
        self[key] = number = len(self)
        return number


class Corpus:
    """Distinct texts (tokens, space-joined), each counted once: its distinct n-grams of orders 1..4 as ids, with
    their counts.

    The n-grams of text t are entries starts[t]:starts[t + 1] of `ids`, `counts` and `orders` (1..4), by id (so
    by order); entry e is the `places[e]`-th n-gram of its order in its text in pycocoevalcap's order (by first
    position), the order its sums take them in. Ids are this corpus's own; `names` (an n-gram's words,
    space-joined: tokens hold no spaces) are the same everywhere, so that document frequencies counted in
    different corpora add up by name. Each text's words are also kept, as unigram ids, for ROUGE-L."""

    def __init__(self, tokens: Sequence[str]):
        words = [t.split() for t in tokens]  # precook's split
        self.lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        flat = list(chain.from_iterable(words))
        text = np.repeat(np.arange(len(words)), self.lengths)  # per word: its text
        position = np.arange(len(flat)) - np.repeat(_starts(self.lengths)[:-1], self.lengths)  # ... its place
        word = np.fromiter(map(_Numbering().__getitem__, flat), dtype=np.int64, count=len(flat))
        ngram = word  # unigram ids: words numbered in order of first sight
        # Per order: the n-gram starting at each word (-1 where the text ends first), numbered as a pair of the
        # (k-1)-gram there and the word k-1 on; ids of order k follow those of order k - 1.
        occurrences, sizes = [], []  # per order: (word where each occurrence starts, its id); how many ids
        remaining = self.lengths[text] - position  # words from here to the text's end
        for k in range(1, N + 1):
            if k > 1:
                valid = remaining >= k
                pair = np.where(valid, ngram * (len(flat) + 1) + np.roll(word, -(k - 1)), -1)
                ngram = np.full(len(flat), -1, dtype=np.int64)
                ngram[valid] = np.unique(pair[valid], return_inverse=True)[1]
            at = np.flatnonzero(ngram >= 0)
            occurrences.append((at, ngram[at] + sum(sizes)))
            sizes.append(int(ngram.max(initial=-1)) + 1)
        self.ngrams = max(sum(sizes), 1)  # ids are below this
        self.words = occurrences[0][1].astype(np.int32)  # each text's words as unigram ids, text after text
        self.word_starts = _starts(self.lengths)
        # Rouge splits on " ": its words are these where the text is its words " "-joined (not an empty text)
        self.plain = np.fromiter((" ".join(w) == t != "" for t, w in zip(tokens, words)), dtype=bool, count=len(words))
        order_of = np.repeat(np.arange(1, N + 1), sizes)  # per id
        o_word, o_id = (np.concatenate(parts) for parts in zip(*occurrences))
        first_word = np.zeros(sum(sizes), dtype=np.int64)
        first_word[o_id] = o_word  # where each n-gram occurs (one of its places)
        self.names = [" ".join(flat[p : p + k]) for p, k in zip(first_word.tolist(), order_of.tolist())]
        # Distinct (text, n-gram) pairs, sorted, so by text then order; the first occurrence of each (occurrences
        # run by order, then word) is its first place in the text, which gives its rank in pycocoevalcap's order.
        keys, first, self.counts = np.unique(text[o_word] * self.ngrams + o_id, return_index=True, return_counts=True)
        entry_text, ids = np.divmod(keys, self.ngrams)
        # Kept until the CIDEr-D pass, for every text of a chunk: the narrowest types that hold them.
        self.ids = ids.astype(np.int32 if self.ngrams < 2**31 else np.int64)
        self.counts = self.counts.astype(np.min_scalar_type(int(self.counts.max(initial=0))))
        self.orders = order_of[ids].astype(np.int8)
        self.starts = _starts(np.bincount(entry_text, minlength=len(words)))
        segment = entry_text * N + self.orders - 1
        segment_starts = _starts(np.bincount(segment, minlength=len(words) * N))
        longest = int(self.lengths.max(initial=0)) + 1
        by_place = np.argsort(segment * longest + position[o_word[first]])
        places = np.empty(len(segment), dtype=np.min_scalar_type(longest))
        places[by_place] = np.arange(len(segment)) - segment_starts[segment[by_place]]
        self.places = places

    def entries_of(self, texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The entries of each of `texts` one after another, and for each entry which of `texts` it is of."""
        sizes = self.starts[texts + 1] - self.starts[texts]
        return _ranges(self.starts[texts], sizes), np.repeat(np.arange(len(texts)), sizes)


class Samples:
    """Samples of a Corpus: each one's text and references (positions in the corpus's texts)."""

    def __init__(self, tests: Sequence[int], refs: Sequence[Sequence[int]]):
        self.tests = np.asarray(tests, dtype=np.int64)
        self.ref_counts = np.fromiter(map(len, refs), dtype=np.int64, count=len(refs))
        self.refs = np.fromiter(chain.from_iterable(refs), dtype=np.int64, count=int(self.ref_counts.sum()))
        self.pair_sample = np.repeat(np.arange(len(refs)), self.ref_counts)  # per (sample, reference) pair
        pair_place = np.arange(len(self.refs)) - np.repeat(_starts(self.ref_counts)[:-1], self.ref_counts)
        self.pair_place = pair_place.astype(np.min_scalar_type(int(self.ref_counts.max(initial=0))))

    def __len__(self) -> int:
        return len(self.tests)

    def subset(self, samples: Sequence[int]) -> Samples:
        """These of the samples, in this order."""
        if list(samples) == list(range(len(self))):
            return self
        starts = _starts(self.ref_counts)
        refs = self.refs.tolist()
        return Samples(self.tests[samples], [refs[starts[s] : starts[s + 1]] for s in samples])

    def blocks(self) -> Iterable[tuple[slice, slice]]:
        """(samples, their pairs) in blocks of _BLOCK samples."""
        pair_starts = _starts(self.ref_counts)
        for start in range(0, len(self), _BLOCK):
            end = min(start + _BLOCK, len(self))
            yield slice(start, end), slice(int(pair_starts[start]), int(pair_starts[end]))


def _comparisons(corpus: Corpus, samples: Samples, pairs: slice):
    """For each (pair, n-gram of its test): the test's entry, the pair, and the reference's count of it."""
    entries, pair = corpus.entries_of(samples.tests[samples.pair_sample[pairs]])
    ref_entries, ref_pair = corpus.entries_of(samples.refs[pairs])
    # Both sides by (pair, n-gram id), ascending (a text's entries are in id order): a sorted search
    mine = pair * corpus.ngrams + corpus.ids[entries]
    held = ref_pair * corpus.ngrams + corpus.ids[ref_entries]
    if not len(held):
        return entries, pair, np.zeros(len(entries), dtype=np.int64)
    found = np.minimum(np.searchsorted(held, mine), len(held) - 1)
    return entries, pair, np.where(held[found] == mine, corpus.counts[ref_entries][found], 0)


# ---------------------------------------------------------------- BLEU-4


def bleu_stats(corpus: Corpus, samples: Samples) -> list[tuple[int, ...]]:
    """(testlen, reflen, guess 1..4, correct 1..4) of each sample, the closest reference length as Bleu uses."""
    correct = np.zeros((len(samples), N), dtype=np.int64)
    for block, pairs in samples.blocks():
        entries, pair, theirs = _comparisons(corpus, samples, pairs)
        # Each test n-gram's count in its best reference: the test's entries repeat once per reference, so a
        # (sample, entry) slot is the sample's first slot plus the entry's place in its text.
        tests = samples.tests[block]
        sizes = corpus.starts[tests + 1] - corpus.starts[tests]
        first_slot = _starts(sizes)
        sample = samples.pair_sample[pairs][pair] - block.start
        slot = first_slot[sample] + entries - corpus.starts[tests][sample]
        most = np.zeros(int(first_slot[-1]), dtype=np.int64)
        np.maximum.at(most, slot, theirs.astype(np.int64))  # ufunc.at is slow when it casts
        own, _ = corpus.entries_of(tests)
        clipped = np.minimum(corpus.counts[own].astype(np.int64), most)
        np.add.at(correct[block], (np.repeat(np.arange(len(tests)), sizes), corpus.orders[own] - 1), clipped)
    test_lengths = corpus.lengths[samples.tests].tolist()
    ref_lengths = corpus.lengths[samples.refs].tolist()
    stats, at = [], 0
    for testlen, refs, row in zip(test_lengths, samples.ref_counts.tolist(), correct.tolist()):
        reflen = min((abs(length - testlen), length) for length in ref_lengths[at : at + refs])[1]
        at += refs
        stats.append((testlen, reflen, *(max(0, testlen - k + 1) for k in range(1, N + 1)), *row))
    return stats


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
    """Longest common subsequence length."""
    return _lcs(_positions(a), len(a), b)


def _positions(a: Sequence[str]) -> dict[str, int]:
    """token -> a bit mask of its positions in `a`."""
    positions: dict[str, int] = {}
    for i, token in enumerate(a):
        positions[token] = positions.get(token, 0) | (1 << i)
    return positions


def _lcs(positions: dict[str, int], length: int, b: Sequence[str]) -> int:
    """LCS length of `a` (its _positions and length) and `b`, bit-parallel (Allison and Dix, "A bit-string
    longest-common-subsequence algorithm"): one big-integer step per token of `b` instead of a row of the table."""
    row = (1 << length) - 1  # a 0 bit per matched position, in the lowest `length` bits
    for token in b:
        matched = row & positions.get(token, 0)
        row = (row + matched) | (row - matched)
    return length - (row & ((1 << length) - 1)).bit_count()


def rouge_l(test: str, refs: Sequence[str]) -> float:
    """Rouge.calc_score: ROUGE-L F (beta 1.2) against the best precision and the best recall over the references."""
    candidate = test.split(" ")
    positions = _positions(candidate)  # once for every reference: the LCS length is symmetric
    prec, rec = [], []
    for ref in refs:
        tokens = ref.split(" ")
        lcs = _lcs(positions, len(candidate), tokens)
        prec.append(lcs / float(len(candidate)))
        rec.append(lcs / float(len(tokens)))
    prec_max, rec_max = max(prec), max(rec)
    if prec_max != 0 and rec_max != 0:
        return ((1 + BETA**2) * prec_max * rec_max) / float(rec_max + BETA**2 * prec_max)
    return 0.0


def rouge_ls(corpus: Corpus, samples: Samples, tokens: Sequence[str]) -> list[float]:
    """rouge_l of each sample (`tokens`: the corpus's texts), the LCS lengths of all (sample, reference) pairs
    computed together: each candidate's bit masks in a 64-bit integer. Candidates of more than 64 words, and
    texts whose split(" ") (Rouge's) is not their split() (empty texts), take rouge_l."""
    lengths = corpus.lengths
    fits = corpus.plain[samples.tests] & (lengths[samples.tests] <= 64)
    np.logical_and.at(fits, samples.pair_sample, corpus.plain[samples.refs])
    result = np.zeros(len(samples))
    pairs = np.flatnonzero(fits[samples.pair_sample])
    if len(pairs):
        result[fits] = _rouge_fitting(corpus, samples, np.flatnonzero(fits), pairs)
    refs = samples.refs.tolist()
    starts = _starts(samples.ref_counts).tolist()
    for sample in np.flatnonzero(~fits).tolist():
        sample_refs = [tokens[r] for r in refs[starts[sample] : starts[sample + 1]]]
        result[sample] = rouge_l(tokens[int(samples.tests[sample])], sample_refs)
    return result.tolist()


def _rouge_fitting(corpus: Corpus, samples: Samples, fitting: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """rouge_l of the `fitting` samples, whose (sample, reference) `pairs` these are, by _lcs on uint64 masks."""
    vocabulary = int(corpus.words.max(initial=0)) + 1
    tests = samples.tests[fitting]
    # Each candidate's words: (sample, word) -> the bits of the word's positions, ORed over its repeats.
    positions = _ranges(corpus.word_starts[tests], corpus.lengths[tests])
    which = np.repeat(np.arange(len(fitting)), corpus.lengths[tests])
    place = positions - corpus.word_starts[tests][which]
    keys = fitting[which] * vocabulary + corpus.words[positions]
    order = np.argsort(keys, kind="stable")
    keys, bits = keys[order], np.left_shift(np.uint64(1), place[order].astype(np.uint64))
    first = np.concatenate([[True], keys[1:] != keys[:-1]])
    masks = np.bitwise_or.reduceat(bits, np.flatnonzero(first))
    keys = keys[first]
    # Each reference's words, looked up in its candidate's masks, step by step (the j-th word of every pair).
    refs = samples.refs[pairs]
    sample = samples.pair_sample[pairs]
    words_at = _ranges(corpus.word_starts[refs], corpus.lengths[refs])
    pair = np.repeat(np.arange(len(pairs)), corpus.lengths[refs])
    step = (words_at - corpus.word_starts[refs][pair]).astype(np.min_scalar_type(int(corpus.lengths.max())))
    wanted = sample[pair] * vocabulary + corpus.words[words_at]
    found = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    match = np.where(keys[found] == wanted, masks[found], np.uint64(0))
    length = corpus.lengths[samples.tests[sample]].astype(np.uint64)
    full = np.where(length == 64, ~np.uint64(0), np.left_shift(np.uint64(1), length % 64) - np.uint64(1))
    row = full.copy()  # a 1 bit per candidate word not yet matched
    order = np.argsort(step, kind="stable")
    bounds = _starts(np.bincount(step, minlength=1))
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        at = order[start:end]  # one word of each pair long enough: a fancy-indexed update each
        current = row[pair[at]]
        matched = current & match[at]
        row[pair[at]] = (current + matched) | (current - matched)
    unmatched = np.unpackbits((row & full).view(np.uint8)).reshape(len(pairs), 64).sum(axis=1)
    lcs = length.astype(np.int64) - unmatched
    # Rouge.calc_score's floats: precision and recall per reference, their maxima, then F
    prec = lcs / corpus.lengths[samples.tests[sample]].astype(np.float64)
    rec = lcs / corpus.lengths[refs].astype(np.float64)
    slot = np.searchsorted(fitting, sample)
    prec_max, rec_max = np.zeros(len(fitting)), np.zeros(len(fitting))
    np.maximum.at(prec_max, slot, prec)
    np.maximum.at(rec_max, slot, rec)
    scored = (prec_max != 0) & (rec_max != 0)
    numerator = (1 + BETA**2) * prec_max * rec_max
    denominator = rec_max + BETA**2 * prec_max
    return np.divide(numerator, denominator, out=np.zeros(len(fitting)), where=scored)


def mean(scores: Iterable[float]) -> float:
    """The set's score from its samples', as Rouge and Cider average them (numpy's pairwise sum, in order)."""
    return float(np.mean(np.array(list(scores))))


# ---------------------------------------------------------------- CIDEr-D


def document_frequencies(corpus: Corpus, samples: Samples, sets: Sequence[np.ndarray]) -> list[dict[str, int]]:
    """For each set of samples (their indices in `samples`): n-gram name -> how many of its samples' references
    hold it (each sample counts once, however many of its references hold it)."""
    entries, pair = corpus.entries_of(samples.refs)
    held = _distinct(samples.pair_sample[pair] * len(corpus.names) + corpus.ids[entries])
    sample, ngram = held // max(len(corpus.names), 1), held % max(len(corpus.names), 1)
    result = []
    for members in sets:
        inside = np.zeros(len(samples), dtype=bool)
        inside[members] = True
        frequency = np.bincount(ngram[inside[sample]], minlength=len(corpus.names))
        present = np.flatnonzero(frequency)
        result.append(dict(zip(map(corpus.names.__getitem__, present.tolist()), frequency[present].tolist())))
    return result


def ciders(corpus: Corpus, samples: Samples, frequency: Mapping[str, int], set_size: int) -> list[float]:
    """CIDEr-D of each sample, given the document frequencies of the whole set it is scored in (`frequency`:
    n-gram name -> how many samples' references hold it; `set_size`: how many samples the set has)."""
    ref_len = np.log(float(set_size))
    document = np.fromiter(map(frequency.get, corpus.names, repeat(0)), dtype=np.int64, count=len(corpus.names))
    distinct, which = np.unique(document, return_inverse=True)
    # ref_len - np.log(max(1.0, df)) as pycocoevalcap takes it, one numpy log per distinct frequency
    idf = np.array([ref_len - np.log(max(1.0, float(d))) for d in distinct.tolist()], dtype=np.float64)
    weights = idf[which]
    used = np.unique(np.concatenate([samples.tests, samples.refs]))
    entries, _ = corpus.entries_of(used)
    # counts2vec: tf-idf values, their norms per (text, order), and the length CIDEr-D compares (bigrams)
    values = np.zeros(len(corpus.ids))
    values[entries] = corpus.counts[entries].astype(np.float64) * weights[corpus.ids[entries]]
    squares = _squares(values[entries], corpus.counts[entries] == 1, weights, corpus.ids[entries])
    segment = (np.repeat(used, corpus.starts[used + 1] - corpus.starts[used])) * N + corpus.orders[entries] - 1
    norms = np.sqrt(_folds(squares, segment, corpus.places[entries], len(corpus.lengths) * N)).reshape(-1, N)
    bigrams = np.maximum(corpus.lengths - 1, 0)
    scores = np.zeros((len(samples), N))
    for block, pairs in samples.blocks():
        entries, pair, theirs = _comparisons(corpus, samples, pairs)
        mine = values[entries]
        their_values = theirs.astype(np.float64) * weights[corpus.ids[entries]]  # 0.0 where the reference lacks it
        products = np.minimum(mine, their_values) * their_values
        cosine = _folds(
            products, pair * N + corpus.orders[entries] - 1, corpus.places[entries], (pairs.stop - pairs.start) * N
        )
        cosine = cosine.reshape(-1, N)
        tests, refs = samples.tests[samples.pair_sample[pairs]], samples.refs[pairs]
        denominator = norms[tests] * norms[refs]
        cosine = np.divide(cosine, denominator, out=cosine, where=(norms[tests] != 0) & (norms[refs] != 0))
        delta = bigrams[tests] - bigrams[refs]
        steps, where = np.unique(delta, return_inverse=True)
        penalty = np.array([np.e ** (-(float(d) ** 2) / (2 * SIGMA**2)) for d in steps.tolist()])[where]
        # the sample's score: its pairs' values added in reference order, from 0.0
        scores[block] = _folds(
            cosine * penalty[:, None],
            samples.pair_sample[pairs] - block.start,
            samples.pair_place[pairs],
            block.stop - block.start,
        )
    result = []
    for score, refs in zip(scores, samples.ref_counts.tolist()):
        score_avg = np.mean(score)
        score_avg /= refs
        score_avg *= 10.0
        result.append(float(score_avg))
    return result


def _squares(values: np.ndarray, single: np.ndarray, weights: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """pow(value, 2) of each value, as the C library's pow gives it. A value of an n-gram counted once is its
    weight (1.0 * w = w): those squares are taken once per n-gram, the others one by one."""
    used = np.unique(ids[single])
    table = np.zeros(len(weights))
    table[used] = np.fromiter(map(pow, weights[used].tolist(), repeat(2)), dtype=np.float64, count=len(used))
    squares = table[ids]
    several = np.flatnonzero(~single)
    squares[several] = np.fromiter(map(pow, values[several].tolist(), repeat(2)), dtype=np.float64, count=len(several))
    return squares


def _folds(values: np.ndarray, segment: np.ndarray, place: np.ndarray, segments: int) -> np.ndarray:
    """Per segment, its values added one after another in the order of `place` (0, 1, ... within a segment),
    starting from 0.0: what a Python loop adding them gives, to the bit. `values` may have trailing dimensions."""
    sums = np.zeros((segments, *values.shape[1:]))
    order = np.argsort(place, kind="stable")
    bounds = _starts(np.bincount(place, minlength=1))
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        step = order[start:end]  # at most one value per segment: a fancy-indexed add is one addition each
        sums[segment[step]] += values[step]
    return sums


def _distinct(values: np.ndarray) -> np.ndarray:
    """np.unique by sorting, which is faster here than the hash table numpy 2 uses without return_ flags."""
    values = np.sort(values)
    return values[np.concatenate([[True], values[1:] != values[:-1]])] if len(values) else values


def _starts(sizes: np.ndarray) -> np.ndarray:
    """Offsets of consecutive blocks of these sizes, and the end."""
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def _ranges(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """starts[i], starts[i] + 1, ..., starts[i] + sizes[i] - 1 for each i, one after another."""
    return np.repeat(starts - _starts(sizes)[:-1], sizes) + np.arange(int(sizes.sum()))
