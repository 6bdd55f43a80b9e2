"""Caption metrics against every reference: BLEU-4, METEOR, ROUGE-L and CIDEr, through pycocoevalcap.

pycocoevalcap is the COCO caption evaluation code that published caption numbers come from, so its definitions
are used as they are (coco.py computes them per sample, to its floats; METEOR is its own scorer): BLEU with the
closest reference length, ROUGE-L with beta 1.2, CIDEr-D (sigma 6, document frequencies from the references of
the set scored, x10), and METEOR 1.5. Tokens are its tokenizer's (ptb.py):
CoreNLP's PTBTokenizer where Java is, else a Python reproduction of it; either way brackets stay as the words
-lrb- -rrb- -lsb- -rsb- -lcb- -rcb-, as pycocoevalcap keeps them. METEOR is a Java program: without `java` on
PATH it is left out, and the result says so. sacrebleu and rouge-score were not used: they compute BLEU and
ROUGE-L differently from the COCO definitions (sentence splitting, smoothing, the reference length), so their
numbers would not be comparable with published caption results.
"""

from __future__ import annotations

import atexit
import functools
import shutil
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from specvlm.evaluation import coco
from specvlm.evaluation.ptb import default_tokenizer, tokenize_texts

METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


@dataclass
class CaptionScores:
    scores: dict[str, float]  # metric name -> corpus score; METEOR absent when it could not run
    tokenizer: str  # ptb.TOKENIZERS key: whose tokens were scored
    notes: list[str] = field(default_factory=list)  # why a metric is missing


class SampleScores(NamedTuple):
    """What one sample contributes to its set's scores, whatever set it is scored in (CIDEr-D, which depends on
    the set's document frequencies, is computed per set: coco.Cider)."""

    bleu: tuple[int, ...]  # coco.bleu_stats
    rouge: float  # coco.rouge_l
    meteor: str | None  # METEOR's statistics of the sample (its SCORE line); None when METEOR does not run


def meteor_available() -> bool:
    return shutil.which("java") is not None


def sample_scores(corpus: coco.Corpus, samples: coco.Samples, tokens: Sequence[str], *, meteor: bool):
    """Each sample's contribution, from its text and references (positions in `corpus`, whose texts are
    `tokens`). `meteor`: compute METEOR's statistics (needs Java; meteor_notes says when it cannot run)."""
    bleus, rouges = coco.bleu_stats(corpus, samples), coco.rouge_ls(corpus, samples, tokens)
    if not meteor:
        return [SampleScores(bleu, rouge, None) for bleu, rouge in zip(bleus, rouges)]
    refs, result, at = samples.refs.tolist(), [], 0
    for bleu, rouge, test, count in zip(bleus, rouges, samples.tests.tolist(), samples.ref_counts.tolist()):
        result.append(SampleScores(bleu, rouge, _meteor_stat(tokens[test], [tokens[r] for r in refs[at : at + count]])))
        at += count
    return result


def corpus_of(tests: Sequence[str], refs: Sequence[Sequence[str]]) -> tuple[coco.Corpus, coco.Samples, list[str]]:
    """The samples with these tokens (a text, its references), their distinct texts counted once (and listed)."""
    index: dict[str, int] = {}
    positions = [index.setdefault(t, len(index)) for t in tests]
    ref_positions = [[index.setdefault(r, len(index)) for r in sample] for sample in refs]
    return coco.Corpus(list(index)), coco.Samples(positions, ref_positions), list(index)


def set_scores(samples: Sequence[SampleScores], ciders: Sequence[float], tokenizer: str, meteor: bool):
    """The corpus scores of a set from its samples' contributions and CIDEr-D scores (in the set's order), as
    pycocoevalcap combines them."""
    if not samples:
        return CaptionScores({}, tokenizer, ["no captions to score"])
    result = CaptionScores(
        {"BLEU-4": coco.bleu4([sum(column) for column in zip(*(s.bleu for s in samples))])}, tokenizer
    )
    if meteor and meteor_available():
        result.scores["METEOR"] = _meteor_eval([s.meteor for s in samples])
    else:
        result.notes += meteor_notes(meteor)
    result.scores["ROUGE-L"] = coco.mean(s.rouge for s in samples)
    result.scores["CIDEr"] = coco.mean(ciders)
    return result


def meteor_notes(meteor: bool) -> list[str]:
    """Why METEOR is missing, if it is."""
    if not meteor:
        return ["METEOR not computed (turned off)"]
    if not meteor_available():
        return ["METEOR left out: it is a Java program and no `java` is on PATH (install Java 8+)"]
    return []


def caption_scores(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    meteor: bool = True,
    tokenizer: str | None = None,
) -> CaptionScores:
    """Corpus scores of `predictions` (one caption per sample) against each sample's references, in the tokens of
    `tokenizer` (ptb.TOKENIZERS; default: ptb-java where Java is, else ptb-python)."""
    tokenizer = tokenizer or default_tokenizer()
    texts = [*predictions.values(), *(r for key in predictions for r in references[key])]
    return token_scores(predictions, references, tokenize_texts(texts, tokenizer), tokenizer, meteor=meteor)


def token_scores(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    tokens: Mapping[str, str],
    tokenizer: str,
    *,
    meteor: bool = True,
) -> CaptionScores:
    """caption_scores with every text already tokenized by `tokenizer` (`tokens`: text -> its tokens)."""
    if not predictions:
        return set_scores([], [], tokenizer, meteor)
    keys = list(predictions)
    tests, refs = [tokens[predictions[k]] for k in keys], [[tokens[r] for r in references[k]] for k in keys]
    corpus, samples, texts = corpus_of(tests, refs)
    contributions = sample_scores(corpus, samples, texts, meteor=meteor and meteor_available())
    frequency = coco.document_frequencies(corpus, samples, [np.arange(len(samples))])[0]
    return set_scores(contributions, coco.ciders(corpus, samples, frequency, len(samples)), tokenizer, meteor)


# pycocoevalcap's Meteor.compute_score sends each sample's SCORE line (its statistics), then one EVAL line with
# all of them, whose answer is the corpus score. The two halves are called separately here so that samples can
# be scored in different processes (each with its own METEOR) and combined in one EVAL, to the same float.


def _meteor_stat(test: str, refs: Sequence[str]) -> str:
    scorer = _meteor_scorer()
    with scorer.lock:
        return scorer._stat(test, list(refs))


def _meteor_eval(stats: Sequence[str]) -> float:
    scorer = _meteor_scorer()
    with scorer.lock:
        scorer.meteor_p.stdin.write("{}\n".format(" ||| ".join(["EVAL", *stats])).encode())
        scorer.meteor_p.stdin.flush()
        for _ in stats:  # the per-sample scores, not needed
            scorer.meteor_p.stdout.readline()
        return float(scorer.meteor_p.stdout.readline().strip())


@functools.cache
def _meteor_scorer():
    """One METEOR process per Python process: starting one loads its paraphrase tables, seconds each time, and a
    report scores many sets (tasks, slices, strategies)."""
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    atexit.register(_stop, scorer.meteor_p)
    return scorer


def _stop(process) -> None:
    # pycocoevalcap stops its Java process only when the scorer is collected, which an exiting interpreter
    # may never do.
    process.stdin.close()
    process.wait()
