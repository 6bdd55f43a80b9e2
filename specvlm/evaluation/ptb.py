"""Caption tokens as pycocoevalcap makes them: Stanford CoreNLP's PTBTokenizer, lowercased, less punctuation.

Published COCO caption numbers come from pycocoevalcap, whose tokenizer runs CoreNLP 3.4.1's PTBTokenizer (a
Java program, shipped inside pycocoevalcap) with -preserveLines -lowerCase, then drops its punctuation tokens.
Two ways to the same tokens:

    ptb-java    that tokenizer itself, one Java process for a whole set (the default where `java` is on PATH)
    ptb-python  a reproduction in Python for machines without Java: NLTK's Penn Treebank rules, plus what
                CoreNLP does that they do not. Brackets become the words -lrb- -rrb- -lsb- -rsb- -lcb- -rcb-,
                which pycocoevalcap keeps (its punctuation list spells them in capitals, and the tokens
                arrive lowercased). Abbreviations CoreNLP knows ("mr.", "st.", "jan.", "u.s.", "e.g.") keep
                their period. Curly quotes, dashes and "…" become quote, dash and ellipsis tokens, which are
                dropped. Characters outside Unicode's basic plane (most emoji) are deleted: CoreNLP 3.4.1 reads
                UTF-16 units and cannot tokenize surrogates.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

JAVA = "ptb-java"
PYTHON = "ptb-python"
TOKENIZERS = {
    JAVA: "pycocoevalcap's PTB tokenizer (Stanford CoreNLP 3.4.1 PTBTokenizer, Java)",
    PYTHON: "PTB tokens in Python (NLTK Treebank rules with CoreNLP's brackets, abbreviations and quotes)",
}

_LINE_BREAKS = re.compile(r"[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")  # what str.splitlines() splits on

# CoreNLP 3.4.1's abbreviations that keep their period in any case ("mr.", "Mr.", "MR."), found by running its
# PTBTokenizer on each; the ones after them keep it only capitalised ("Tex." but "tex ."), the last only when not
# all capitals ("Pty." but "PTY .").
_ANY_CASE = (
    "mr mrs ms dr drs prof profs st ste mt ft ave jr sr co cos inc corp ltd bancorp intl sys assn bhd plc rt "
    "jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri etc vs al seq bldg blvd rd "
    "esq bros gen col lt sgt capt rev gov govs sen sens rep reps adm maj cpl pvt messrs atty attys pres lieut hon "
    "brig cmdr comdr pfc spc supt supts det adj adv asst assoc ens insp mlle mme msgr sfc dept univ est tel ext sq "
    "ala ariz calif colo conn ct dak fla ga ind kan kans ky md mich minn mo mont neb nev okla penn tenn va vt wis "
    "wisc wyo"
)
_ABBREVIATIONS = frozenset(_ANY_CASE.split())
_CAPITALISED = "tex wash mass pa az ark del ill la miss ore"
_CAPITALISED_ABBREVIATIONS = frozenset(_CAPITALISED.split())
_MIXED_CASE_ABBREVIATIONS = frozenset({"pty", "ptys", "pte", "mfg"})
_ACRONYM = re.compile(r"[^\W\d_](\.[^\W\d_])+|ph\.d|ed\.d", re.IGNORECASE)  # u.s, e.g, a.m (less the final .)
# A word's final period (not an ellipsis's, not a decimal point)
_WORD_PERIOD = re.compile(r"(?<![\w.])([^\W\d_](?:[\w.]*\w)?)\.(?![\w.])")
# A quote opening a word ('fine' `back'), which NLTK leaves glued to it; not the apostrophe of 's, 'll, 're...
_OPENING_QUOTE = re.compile(r"(?<!\S)['`](?=\w)(?!(?:s|d|m|t|ll|re|ve)\b)", re.IGNORECASE)
_NEXT_LINE = "A"  # the line written after each caption for the Java tokenizer (see _java_tokens)
_KEPT_PERIOD = "\ue000"  # stands for an abbreviation's period while NLTK tokenizes (it splits off final periods)
_CHARACTERS = str.maketrans(
    {
        "(": " -LRB- ",
        ")": " -RRB- ",
        "[": " -LSB- ",
        "]": " -RSB- ",
        "{": " -LCB- ",
        "}": " -RCB- ",
        "\u201c": ' " ',  # “ ” „: CoreNLP's `` and '', dropped
        "\u201d": ' " ',
        "\u201e": ' " ',
        "\u2018": " ` ",  # ‘: its ` (dropped); ’ is an apostrophe ("it’s") or a closing quote, as ' is
        "\u2019": "'",
        "\u2013": " -- ",  # – —: CoreNLP's --
        "\u2014": " -- ",
        "\u2026": " ... ",  # …
    }
)


def default_tokenizer() -> str:
    return JAVA if shutil.which("java") else PYTHON


def tokenize_texts(texts: Iterable[str], tokenizer: str) -> dict[str, str]:
    """Each distinct text once -> its tokens, space-joined, as pycocoevalcap's scorers take them."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown caption tokenizer {tokenizer!r}; use one of {', '.join(TOKENIZERS)}")
    distinct = list(dict.fromkeys(texts))
    tokens = _java_tokens(distinct) if tokenizer == JAVA else [python_tokens(t) for t in distinct]
    return dict(zip(distinct, tokens))


def _java_tokens(texts: list[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer.tokenize, on a list: the same jar, flags and punctuation. Its own wrapper
    writes its input file beside the jar, inside the installed package, which a read-only install refuses."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    if not texts:
        return []
    if shutil.which("java") is None:
        raise ValueError(
            f"caption tokenizer {JAVA!r} runs Java and no `java` is on PATH: install Java 8+, or set the caption "
            f"tokenizer to {PYTHON!r} (caption_tokenizer in an evaluation config, --tokenizer for jobs.score)"
        )
    jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    dropped = frozenset(ptbtokenizer.PUNCTUATIONS)
    with tempfile.TemporaryDirectory() as folder:
        lines = Path(folder) / "captions.txt"
        # One caption a line (-preserveLines); any line break inside one would shift every caption after it.
        # CoreNLP looks past a line's end: a final "a." stays one token before a lowercase line and splits before
        # a capitalised one. A fixed capitalised line after every caption makes its tokens its own, whatever set
        # or order it is tokenized in, as after the next caption of a COCO file (they start with a capital).
        body = "".join(f"{_LINE_BREAKS.sub(' ', t)}\n{_NEXT_LINE}\n" for t in texts)
        lines.write_text(body, encoding="utf-8")
        # pycocoevalcap's command, with the JIT compiler at its first tier: a tokenizer run is too short for the
        # optimising tier to pay off (half the CPU on 20,000 captions, the same tokens). A JVM that does not know
        # the option ignores it.
        jvm = ["-XX:+IgnoreUnrecognizedVMOptions", "-XX:TieredStopAtLevel=1"]
        tokenizer = ["edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
        command = ["java", *jvm, "-cp", str(jar), *tokenizer]
        done = subprocess.run([*command, str(lines)], capture_output=True, check=False)
    out = done.stdout.decode("utf-8").split("\n")[: 2 * len(texts)]
    if done.returncode != 0 or len(out) != 2 * len(texts):
        raise RuntimeError(
            f"pycocoevalcap's Java PTB tokenizer failed (exit {done.returncode}, {len(out)} of {2 * len(texts)} "
            f"lines): "
            f"{done.stderr.decode(errors='replace')[-500:]}; set the caption tokenizer to {PYTHON!r} to do without"
        )
    return [" ".join([w for w in line.rstrip().split(" ") if w not in dropped]) for line in out[::2]]


def python_tokens(text: str) -> str:
    """The tokens of `text` as ptb-java gives them (see the module's notes), space-joined."""
    text = _LINE_BREAKS.sub(" ", text)
    text = "".join(c for c in text if c <= "\uffff").translate(_CHARACTERS)
    text = _OPENING_QUOTE.sub(" ` ", _WORD_PERIOD.sub(_word_period, text))
    tokens = _treebank().tokenize(text)
    return " ".join(t.lower().replace(_KEPT_PERIOD, ".") for t in tokens if t.lower() not in _punctuation_set())


def _word_period(match: re.Match) -> str:
    word = match.group(1)
    return word + (_KEPT_PERIOD if _is_abbreviation(word) else " .")


def _is_abbreviation(word: str) -> bool:
    lower = word.lower()
    if lower in _ABBREVIATIONS or _ACRONYM.fullmatch(word):
        return True
    if lower in _CAPITALISED_ABBREVIATIONS:
        return word[0].isupper()
    return lower in _MIXED_CASE_ABBREVIATIONS and not word.isupper()


@functools.cache
def _treebank():
    from nltk.tokenize import TreebankWordTokenizer

    return TreebankWordTokenizer()


@functools.cache
def _punctuation_set() -> frozenset[str]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    return frozenset(PUNCTUATIONS)
