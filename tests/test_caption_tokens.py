"""Caption tokens and metrics against pycocoevalcap run the standard way (its Java PTB tokenizer), on captions
with brackets, abbreviations, curly quotes, emoji and other non-ASCII text."""

from __future__ import annotations

import contextlib
import io
import shutil

import pytest

from specvlm.evaluation import ptb
from specvlm.evaluation.captions import caption_scores

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's tokenizer needs Java")

# image -> (a model's caption, the references)
TRICKY = {
    1: (
        "A man (in red) walks a dog [left].",
        ["a man in red walks a dog on the left.", "A man (wearing red) and a dog."],
    ),
    2: ("Mr. Smith and Dr. Jones in the U.S. capitol.", ["two men in the u.s. capitol.", "Mr. Smith meets Dr. Jones."]),
    3: ("“Hello,” she says, it’s a ‘fine’ day… isn’t it?", ["a woman says hello.", "“A fine day,” she says."]),
    4: ("A dog 🐶 sits on the café’s terrace.", ["a dog on a café terrace.", "A dog 🐕 sitting at a café."]),
    5: ("A naïve façade in 日本 with a crêpe stand — busy.", ["a crêpe stand in 日本.", "a busy street in japan."]),
    6: ("Two kids 👧👦 play with a ball ⚽ on the grass.", ["two kids play ball ⚽ on grass.", "Kids playing soccer."]),
    7: ("The St. Louis arch at 5 p.m. on Jan. 3rd, e.g. sunny.", ["the st. louis arch.", "An arch (St. Louis)."]),
    8: ('A sign reads "STOP" -- red & white.', ["a red & white stop sign.", "A {red} sign: 'STOP'."]),
    9: ("A woman's hat isn't big; it can't fly!", ["a woman's small hat.", "a hat that cannot fly."]),
    10: ("Mrs. Brown's cat (a tabby) naps... quietly.", ["a tabby cat naps.", "Mrs. Brown’s tabby cat sleeping."]),
    11: ("A 3-year-old boy with a kite – windy day.", ["a boy flies a kite.", "A 3-year-old with a kite [windy]."]),
    12: ("A street in Washington, D.C. at night.", ["a street at night in d.c.", "Washington D.C. by night."]),
}
PREDICTIONS = {k: v[0] for k, v in TRICKY.items()}
REFERENCES = {k: v[1] for k, v in TRICKY.items()}


def _pycocoevalcap_standard_way(predictions, references) -> dict[str, float]:
    """pycocoevalcap's own COCOEvalCap steps: PTBTokenizer on both sides, then each scorer."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = PTBTokenizer().tokenize({k: [{"caption": r} for r in refs] for k, refs in references.items()})
    res = PTBTokenizer().tokenize({k: [{"caption": predictions[k]}] for k in references})
    with contextlib.redirect_stdout(io.StringIO()):
        bleu = Bleu(4).compute_score(gts, res)[0][3]
    return {
        "BLEU-4": bleu,
        "METEOR": Meteor().compute_score(gts, res)[0],
        "ROUGE-L": Rouge().compute_score(gts, res)[0],
        "CIDEr": Cider().compute_score(gts, res)[0],
    }


@needs_java
def test_caption_metrics_equal_pycocoevalcap_with_its_java_tokenizer_on_tricky_captions():
    expected = _pycocoevalcap_standard_way(PREDICTIONS, REFERENCES)
    result = caption_scores(PREDICTIONS, REFERENCES)
    assert result.tokenizer == ptb.JAVA  # the default where Java is
    assert result.scores.keys() == expected.keys()
    for metric, value in expected.items():
        assert result.scores[metric] == pytest.approx(value, abs=1e-6), metric


@needs_java
def test_python_tokenizer_gives_the_java_tokens_and_scores_on_tricky_captions(capsys):
    texts = [t for k in TRICKY for t in (PREDICTIONS[k], *REFERENCES[k])]
    java = ptb.tokenize_texts(texts, ptb.JAVA)
    assert ptb.tokenize_texts(texts, ptb.PYTHON) == java
    by_java = caption_scores(PREDICTIONS, REFERENCES, meteor=False, tokenizer=ptb.JAVA).scores
    by_python = caption_scores(PREDICTIONS, REFERENCES, meteor=False, tokenizer=ptb.PYTHON).scores
    with capsys.disabled():  # the fallback's difference, in the test output
        print("\nptb-python - ptb-java on the tricky set:", {m: by_python[m] - by_java[m] for m in by_java})
    assert by_python == by_java


@pytest.mark.parametrize(
    "text, tokens",
    [  # what pycocoevalcap's Java tokenizer writes for each
        ("A man (in red) [left] {x} walks.", "a man -lrb- in red -rrb- -lsb- left -rsb- -lcb- x -rcb- walks"),
        ("Mr. Smith met Dr. Jones in the U.S. on Jan. 5.", "mr. smith met dr. jones in the u.s. on jan. 5"),
        ("A bus in the U.S.", "a bus in the u.s."),
        ("the tex. ranch, the Tex. ranch", "the tex ranch the tex. ranch"),  # a state only when capitalised
        ("“Hello,” she said — it’s ‘fine’… isn't it?", "hello she said it 's fine is n't it"),
        ("A dog 🐶 on the café's terrace, naïve 日本 ⚽.", "a dog on the café 's terrace naïve 日本 ⚽"),
        ("it's cannot gonna e.g. a.m. ph.d.", "it 's can not gon na e.g. a.m. ph.d."),
        ("\"quoted\" 'single' `back' a--b a-b 3.5 wait...", "quoted single back a b a-b 3.5 wait"),
        ("two\nlines\u2028here", "two lines here"),
    ],
)
def test_python_tokenizer_reproduces_corenlp_on_brackets_abbreviations_quotes_and_unicode(text, tokens):
    assert ptb.python_tokens(text) == tokens


def test_unknown_tokenizer_is_named():
    with pytest.raises(ValueError, match="caption tokenizer 'nltk'"):
        ptb.tokenize_texts(["a cat"], "nltk")


def test_java_tokenizer_without_java_says_what_to_do(monkeypatch):
    monkeypatch.setattr(ptb.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match=r"no `java` is on PATH.*ptb-python"):
        ptb.tokenize_texts(["a cat"], ptb.JAVA)


@needs_java
def test_java_tokens_of_a_caption_do_not_depend_on_the_caption_after_it():
    # CoreNLP splits a line's final "a." before a capitalised line only: without a fixed line after each caption,
    # its tokens would change with the set (or the chunk of an output) it is tokenized with.
    before_lowercase = ptb.tokenize_texts(["two red a.", "the cat"], ptb.JAVA)
    before_capital = ptb.tokenize_texts(["two red a.", "The cat"], ptb.JAVA)
    assert before_lowercase["two red a."] == before_capital["two red a."] == ptb.python_tokens("two red a.")
