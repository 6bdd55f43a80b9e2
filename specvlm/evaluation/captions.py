"""Caption metrics against every reference: BLEU-4, METEOR, ROUGE-L and CIDEr, through pycocoevalcap.

pycocoevalcap is the COCO caption evaluation code that published caption numbers come from, so its scorers are
used as they are: BLEU with the closest reference length, ROUGE-L with beta 1.2, CIDEr-D (sigma 6, document
frequencies from the references of the set scored, x10), and METEOR 1.5. Tokens are its tokenizer's (ptb.py):
CoreNLP's PTBTokenizer where Java is, else a Python reproduction of it; either way brackets stay as the words
-lrb- -rrb- -lsb- -rsb- -lcb- -rcb-, as pycocoevalcap keeps them. METEOR is a Java program: without `java` on
PATH it is left out, and the result says so. sacrebleu and rouge-score were not used: they compute BLEU and
ROUGE-L differently from the COCO definitions (sentence splitting, smoothing, the reference length), so their
numbers would not be comparable with published caption results.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import shutil
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

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
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as e:
        raise ImportError(f"caption metrics need pycocoevalcap and nltk: pip install 'specvlm[eval]' ({e})") from e

    if not predictions:
        return CaptionScores({}, tokenizer, ["no captions to score"])
    res = {key: [tokens[text]] for key, text in predictions.items()}
    gts = {key: [tokens[r] for r in references[key]] for key in predictions}
    with contextlib.redirect_stdout(io.StringIO()):  # BLEU prints its length statistics
        bleu, _ = Bleu(4).compute_score(gts, res)
    result = CaptionScores({"BLEU-4": float(bleu[3])}, tokenizer)
    if not meteor:
        result.notes.append("METEOR not computed (turned off)")
    elif not meteor_available():
        result.notes.append("METEOR left out: it is a Java program and no `java` is on PATH (install Java 8+)")
    else:
        result.scores["METEOR"] = _meteor(gts, res)
    result.scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    result.scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
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
