"""Short-answer metrics: VQA accuracy as the published VQA numbers are computed, normalised exact match, and
multiple-choice letter accuracy.

No maintained package ships the VQA evaluation (it lives as a script in the VQA authors' repository, and copies
of it inside large frameworks), so its rules are written out here, table for table: Antol et al., "VQA: Visual
Question Answering", and Goyal et al., "Making the V in VQA Matter" (VQAv2) define the metric. Two conventions
are reproduced exactly (`evaluation.vqa_convention`; they differ only on answers VQA's annotators never write):

    lmms-eval  lmms-eval's VQAv2 scoring (the default): the prediction is always normalised, first through
               EvalAI's answer processor (lowercased, commas and question marks dropped, "'s" split off), the
               humans' answers only when they disagree.
    official   the VQA authors' evaluation script (vqaEval.py): when all ten humans wrote the same string the
               prediction must equal it as written ("Yes" scores 0 against ten "yes"); otherwise both are
               normalised.

Normalising is the script's: punctuation (a mark next to a space or in a number is deleted, one inside a word
splits it), periods not before a digit deleted, at most 32 of them (the script passes re.UNICODE, 32, where
re.sub takes its count, and every copy of it inherits that), then lowercased, number words to digits, articles
out, contractions in.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

VQA_HUMANS = 10  # answers per question in VQA; rows with this many references get VQA accuracy
VQA_CONVENTIONS = ("lmms-eval", "official")

# The script's table, less its entries that map a word to itself and its capitalised ones (Im, Ive, Id've, I'dve),
# which never match: words are lowercased before the lookup.
_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",  # sic: the script maps this one backwards
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'  # each one a mark
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # as written in the script: a period not followed by a digit
_PERIODS_STRIPPED = 32  # re.UNICODE, which the script passes as re.sub's count
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")


def _whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _punctuation(text: str) -> str:
    """The script's processPunctuation. A mark next to a space (or any mark, in a text with a number like 1,000)
    is deleted; inside a word it splits it ("black/white")."""
    glued = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        out = out.replace(mark, "" if glued or f"{mark} " in text or f" {mark}" in text else " ")
    return _PERIOD.sub("", out, count=_PERIODS_STRIPPED)


def _digits_articles(text: str) -> str:
    """The script's processDigitArticle: lowercased words, number words to digits, articles out, contractions in."""
    words = [_NUMBERS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """VQA's answer normalisation, whitespace, punctuation, then number words, articles and contractions."""
    return _digits_articles(_punctuation(_whitespace(text)))


def _evalai(text: str) -> str:
    """EvalAI's answer processor, which lmms-eval runs on every prediction before the script's rules."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalize_answer(text)


def vqa_accuracy(prediction: str, answers: Sequence[str], convention: str = "lmms-eval") -> float:
    """min(#humans that gave the answer / 3, 1), averaged over the sets of all humans but one, as VQA scores it:
    with k of ten humans agreeing, 0.3 for k = 1, 0.6 for 2, 0.9 for 3, 1 from 4. `convention`: see above."""
    if convention not in VQA_CONVENTIONS:
        raise ValueError(f"unknown VQA convention {convention!r}; use one of {', '.join(VQA_CONVENTIONS)}")
    predicted = _evalai(prediction) if convention == "lmms-eval" else _whitespace(prediction)
    humans = [_whitespace(a) for a in answers]
    if len(set(humans)) > 1:
        humans = [_digits_articles(_punctuation(h)) for h in humans]
        predicted = _digits_articles(_punctuation(predicted))
    agree = sum(h == predicted for h in humans)
    # Leaving out a human who agreed leaves agree - 1 matches; leaving out any other leaves agree.
    left_out_agreeing = agree * min(1.0, (agree - 1) / 3) if agree else 0.0
    return (left_out_agreeing + (len(humans) - agree) * min(1.0, agree / 3)) / len(humans)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference (rows without VQA's ten answers)."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(r) for r in references))
