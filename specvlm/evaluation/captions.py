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
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from specvlm.evaluation import coco
from specvlm.evaluation.ptb import default_tokenizer, tokenize_texts

METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


@dataclass
class CaptionScores:
    scores: dict[str, float]  # metric name -> corpus score; METEOR absent when it could not run
    tokenizer: str  # ptb.TOKENIZERS key: whose tokens were scored
    notes: list[str] = field(default_factory=list)  # why a metric is missing


def meteor_available() -> bool:
    return shutil.which("java") is not None


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
    """caption_scores with every text already tokenized by `tokenizer` (`tokens`: text -> its tokens), so that
    scoring a set and its slices tokenizes each text once."""
    if not predictions:
        return CaptionScores({}, tokenizer, ["no captions to score"])
    res = {key: [tokens[text]] for key, text in predictions.items()}
    gts = {key: [tokens[r] for r in references[key]] for key in predictions}
    # coco.py: pycocoevalcap's BLEU, ROUGE-L and CIDEr to the same floats, without its numpy scalar calls.
    frequency = Counter(ngram for key in gts for ngram in coco.document_ngrams(gts[key]))
    cider = coco.Cider(frequency, len(gts))
    stats = [coco.bleu_stats(res[key][0], gts[key]) for key in gts]
    bleu = coco.bleu4([sum(column) for column in zip(*stats)])
    result = CaptionScores({"BLEU-4": bleu}, tokenizer)
    if not meteor:
        result.notes.append("METEOR not computed (turned off)")
    elif not meteor_available():
        result.notes.append("METEOR left out: it is a Java program and no `java` is on PATH (install Java 8+)")
    else:
        result.scores["METEOR"] = _meteor(gts, res)
    result.scores["ROUGE-L"] = coco.mean(coco.rouge_l(res[key][0], gts[key]) for key in gts)
    result.scores["CIDEr"] = coco.mean(cider.score(res[key][0], gts[key]) for key in gts)
    return result


def _meteor(gts: dict, res: dict) -> float:
    return float(_meteor_scorer().compute_score(gts, res)[0])


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
