"""Task quality of output rows, overall and per slice of any metadata field the input carried.

    vqa      VQA accuracy on rows with ten human answers (answers.VQA_HUMANS), normalised exact match on the rest
    mc       accuracy of the extracted choice letter (an answer that names no letter counts as wrong), and how
             many answers named none
    caption  BLEU-4, METEOR (where Java is), ROUGE-L and CIDEr against every reference (captions.py)

Rows with an error and rows without a reference are counted, not scored. Rows are scored in (shard, key) order,
so the same outputs always give the same numbers, to the last bit.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from statistics import fmean

from specvlm.data.prompts import choice_count, extract_choice
from specvlm.evaluation.answers import VQA_HUMANS, exact_match, vqa_accuracy
from specvlm.evaluation.captions import caption_scores


def score_rows(rows: Sequence[dict], slices: Sequence[str] = (), *, meteor: bool = True) -> dict:
    """The quality of one task's output rows (the output schema's columns): JSON-ready, with a block per slice
    field that the rows' metadata has: {field: {value: quality}}."""
    rows = sorted(rows, key=lambda r: (r["shard_id"], r["key"]))
    quality = _score(rows, meteor)
    by_field = {}
    for name in slices:
        groups = defaultdict(list)
        for row in rows:
            value = _meta(row).get(name)
            if value is not None:
                groups[json.dumps(value) if isinstance(value, (list, dict)) else str(value)].append(row)
        if groups:
            by_field[name] = {value: _score(groups[value], meteor) for value in sorted(groups)}
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


def _score(rows: list[dict], meteor: bool) -> dict:
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
            quality["metrics"]["VQA accuracy"] = fmean(vqa_accuracy(r["text"], _references(r)) for r in humans)
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
        captions = caption_scores(
            {i: r["text"] for i, r in enumerate(scored)},
            {i: _references(r) for i, r in enumerate(scored)},
            meteor=meteor,
        )
        quality["metrics"].update(captions.scores)
        quality["notes"] += captions.notes
    return quality
