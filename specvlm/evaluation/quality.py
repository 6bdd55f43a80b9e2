"""Task quality of output rows, overall and per slice of any metadata field the input carried.

    vqa      VQA accuracy on rows with ten human answers (answers.VQA_HUMANS), in the convention asked for
             (answers.VQA_CONVENTIONS), normalised exact match on the rest
    mc       accuracy of the extracted choice letter (an answer that names no letter counts as wrong), and how
             many answers named none
    caption  BLEU-4, METEOR (where Java is), ROUGE-L and CIDEr against every reference (captions.py), in the
             tokens of the tokenizer asked for (ptb.py)

The quality says which convention or tokenizer made its numbers (`vqa_convention`, `tokenizer`, and a note).

Rows with an error and rows without a reference are counted, not scored. Rows are scored in (shard, key) order,
so the same outputs always give the same numbers, to the last bit.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import fmean

from specvlm.data.prompts import choice_count, extract_choice
from specvlm.evaluation.answers import VQA_CONVENTIONS, VQA_HUMANS, exact_match, vqa_accuracy
from specvlm.evaluation.captions import token_scores
from specvlm.evaluation.ptb import TOKENIZERS, default_tokenizer, tokenize_texts

VQA_CONVENTION_NOTES = {
    "lmms-eval": "VQA accuracy as lmms-eval scores VQAv2: the prediction always normalised (EvalAI's processor)",
    "official": "VQA accuracy as the VQA authors' vqaEval.py scores it: raw strings where all ten humans agree",
}


@dataclass(frozen=True)
class _Scoring:
    meteor: bool
    vqa_convention: str
    tokenizer: str
    tokens: dict[str, str]  # caption text -> its tokens, every text of the rows scored


def score_rows(
    rows: Sequence[dict],
    slices: Sequence[str] = (),
    *,
    meteor: bool = True,
    tokenizer: str | None = None,
    vqa_convention: str = "lmms-eval",
) -> dict:
    """The quality of one task's output rows (the output schema's columns): JSON-ready, with a block per slice
    field that the rows' metadata has: {field: {value: quality}}. `tokenizer`: ptb.TOKENIZERS (default: ptb-java
    where Java is); `vqa_convention`: answers.VQA_CONVENTIONS."""
    if vqa_convention not in VQA_CONVENTIONS:
        raise ValueError(f"unknown VQA convention {vqa_convention!r}; use one of {', '.join(VQA_CONVENTIONS)}")
    rows = sorted(rows, key=lambda r: (r["shard_id"], r["key"]))
    tokenizer = tokenizer or default_tokenizer()
    captions = [r for r in rows if r["task"] == "caption" and r.get("error") is None and _references(r)]
    texts = [t for r in captions for t in (r["text"], *_references(r))]
    scoring = _Scoring(meteor, vqa_convention, tokenizer, tokenize_texts(texts, tokenizer) if texts else {})
    quality = _score(rows, scoring)
    by_field = {}
    for name in slices:
        groups = defaultdict(list)
        for row in rows:
            value = _meta(row).get(name)
            if value is not None:
                groups[json.dumps(value) if isinstance(value, (list, dict)) else str(value)].append(row)
        if groups:
            by_field[name] = {value: _score(groups[value], scoring) for value in sorted(groups)}
    if by_field:
        quality["slices"] = by_field
    return quality


def _meta(row: dict) -> dict:
    try:
        meta = json.loads(row.get("meta") or "{}")
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _references(row: dict) -> list[str]:
    return row.get("references") or ([row["reference"]] if row.get("reference") is not None else [])


def _score(rows: list[dict], scoring: _Scoring) -> dict:
    tasks = sorted({r["task"] for r in rows})
    if len(tasks) != 1:
        raise ValueError(f"rows of one task expected, got {tasks}")
    scored = [r for r in rows if r.get("error") is None and _references(r)]
    quality = {
        "task": tasks[0],
        "samples": len(rows),
        "errors": sum(r.get("error") is not None for r in rows),
        "unscored": sum(r.get("error") is None and not _references(r) for r in rows),
        "metrics": {},
        "notes": [],
    }
    if tasks[0] == "vqa":
        humans = [r for r in scored if len(_references(r)) == VQA_HUMANS]
        others = [r for r in scored if len(_references(r)) != VQA_HUMANS]
        if humans:
            quality["vqa_convention"] = scoring.vqa_convention
            quality["notes"].append(VQA_CONVENTION_NOTES[scoring.vqa_convention])
            quality["metrics"]["VQA accuracy"] = fmean(
                vqa_accuracy(r["text"], _references(r), scoring.vqa_convention) for r in humans
            )
        if others:
            quality["metrics"]["exact match"] = fmean(exact_match(r["text"], _references(r)) for r in others)
        if humans and others:
            quality["notes"].append(
                f"VQA accuracy over the {len(humans)} rows with {VQA_HUMANS} answers, exact match over the "
                f"{len(others)} others"
            )
    elif tasks[0] == "mc":
        letters = [extract_choice(r["text"], choice_count(r.get("prompt"))) for r in scored]
        if scored:
            quality["metrics"]["accuracy"] = fmean(
                letter == r["reference"].strip().lower() for letter, r in zip(letters, scored)
            )
        quality["metrics"]["unparsed"] = sum(letter is None for letter in letters)
    else:
        captions = token_scores(
            {i: r["text"] for i, r in enumerate(scored)},
            {i: _references(r) for i, r in enumerate(scored)},
            scoring.tokens,
            scoring.tokenizer,
            meteor=scoring.meteor,
        )
        quality["tokenizer"] = captions.tokenizer
        quality["metrics"].update(captions.scores)
        quality["notes"] += [f"tokens: {TOKENIZERS[captions.tokenizer]}", *captions.notes]
    return quality
