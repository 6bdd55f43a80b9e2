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

Scoring is split so that rows can be measured in separate pieces (output_scoring.py scores shard files in
parallel processes) and still give the serial numbers exactly:

    measure   each row's slice values and what its metrics need (a VQA or choice score, a caption's BLEU-4
              counts, ROUGE-L and METEOR statistics), plus each caption set's document frequencies, which are
              counts and so add up exactly over pieces; the caption texts are counted once (coco.Corpus, for
              groups of CORPUS_ROWS rows) and kept for the CIDEr-D pass
    ciders    each caption row's CIDEr-D in every set it belongs to (the whole task, its slice of each field),
              given the document frequencies summed over all pieces
    qualities the rows of every piece together, in (shard, key) order: means, sums and METEOR's EVAL per set
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from statistics import fmean

from specvlm.data.prompts import choice_count, extract_choice
from specvlm.evaluation import coco
from specvlm.evaluation.answers import VQA_CONVENTIONS, VQA_HUMANS, exact_match, vqa_accuracy
from specvlm.evaluation.captions import corpus_of, meteor_available, sample_scores, set_scores
from specvlm.evaluation.ptb import TOKENIZERS, default_tokenizer, tokenize_texts

VQA_CONVENTION_NOTES = {
    "lmms-eval": "VQA accuracy as lmms-eval scores VQAv2: the prediction always normalised (EvalAI's processor)",
    "official": "VQA accuracy as the VQA authors' vqaEval.py scores it: raw strings where all ten humans agree",
}
SCORED, ERROR, UNSCORED = "scored", "error", "unscored"
# Caption rows counted in one coco.Corpus: its sorts and look-ups stay small enough for the CPU's caches (25,000
# rows in one corpus took 2.5 times as long per row as 5,000).
CORPUS_ROWS = 5000

# A set of caption rows scored together (CIDEr-D's document frequencies are the set's): (task, the slice field's
# position in Scoring.slices, its value), or (task, None, None) for all of a task's rows.
SetKey = tuple[str, "int | None", "str | None"]


@dataclass(frozen=True)
class Scoring:
    """How rows are scored: the settings of score_rows."""

    slices: tuple[str, ...] = ()
    meteor: bool = True
    tokenizer: str | None = None  # ptb.TOKENIZERS; None: ptb-java where Java is
    vqa_convention: str = "lmms-eval"

    def __post_init__(self):
        if self.vqa_convention not in VQA_CONVENTIONS:
            raise ValueError(f"unknown VQA convention {self.vqa_convention!r}; use one of {', '.join(VQA_CONVENTIONS)}")
        object.__setattr__(self, "tokenizer", self.tokenizer or default_tokenizer())


@dataclass(slots=True)
class RowScore:
    """What one output row contributes to its task's quality."""

    order: tuple[str, str]  # (shard_id, key): rows are combined in this order
    task: str
    state: str  # SCORED, ERROR or UNSCORED (no reference)
    groups: tuple[str | None, ...]  # the row's value of each slice field (None: it has none)
    value: tuple = ()  # scored rows: vqa (ten humans?, score), mc (unparsed?, right?), caption SampleScores
    ciders: tuple[float | None, ...] = ()  # scored captions: CIDEr-D in the whole set, then in each field's slice


@dataclass
class Measured:
    """measure's result for some rows."""

    rows: list[RowScore]
    frequencies: dict[SetKey, Counter] = field(default_factory=dict)  # n-gram name -> samples whose refs hold it
    samples: Counter = field(default_factory=Counter)  # SetKey -> its scored caption rows
    # What the CIDEr-D pass needs, kept where the rows were measured: the caption rows in groups, each with its
    # texts counted once (a Corpus), the rows as samples of them, and each sample's row (its index in `rows`).
    groups: list[tuple[coco.Corpus, coco.Samples, list[int]]] = field(default_factory=list)

    def add(self, other: Measured) -> None:
        """Sum another piece's document frequencies and sample counts into this one's (the rows stay apart)."""
        for key, counter in other.frequencies.items():
            self.frequencies.setdefault(key, Counter()).update(counter)
        self.samples.update(other.samples)

    def totals(self) -> Measured:
        """What measuring these rows adds to the set's totals and scores: the rows and counts, without the
        groups (which stay for ciders_of)."""
        return Measured(self.rows, self.frequencies, self.samples)


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
    scoring = Scoring(tuple(slices), meteor, tokenizer, vqa_convention)
    measured = measure(rows, scoring)
    for index, ciders in ciders_of(measured, measured):
        measured.rows[index].ciders = ciders
    tasks = sorted({r.task for r in measured.rows})
    if len(tasks) != 1:
        raise ValueError(f"rows of one task expected, got {tasks}")
    return qualities(measured.rows, scoring)[tasks[0]]


def measure(rows: Iterable[dict], scoring: Scoring) -> Measured:
    """Every row's contribution, each caption text tokenized once (one tokenizer call for all of them) and
    counted once."""
    rows = list(rows)
    measured, captions = Measured([]), []
    for row in rows:
        # Slices come from the metadata, which is JSON: parsed only when asked for.
        meta = _meta(row) if scoring.slices else {}
        score = RowScore(
            (row["shard_id"], row["key"]),
            row["task"],
            _state(row),
            tuple(_group(meta.get(name)) for name in scoring.slices),
        )
        if score.state == SCORED:
            references = _references(row)
            kind = _kind(row["task"])
            if kind == "vqa" and len(references) == VQA_HUMANS:
                score.value = (True, vqa_accuracy(row["text"], references, scoring.vqa_convention))
            elif kind == "vqa":
                score.value = (False, exact_match(row["text"], references))
            elif kind == "mc":
                letter = extract_choice(row["text"], choice_count(row.get("prompt")))
                score.value = (letter is None, letter == row["reference"].strip().lower())
            else:
                captions.append(len(measured.rows))
        measured.rows.append(score)
    if captions:
        _measure_captions(measured, rows, captions, scoring)
    return measured


def _measure_captions(measured: Measured, rows: list[dict], captions: list[int], scoring: Scoring) -> None:
    """The caption rows' (`captions`: their indices) BLEU-4 counts, ROUGE-L and METEOR statistics, and each
    caption set's document frequencies."""
    tokens = tokenize_texts((t for i in captions for t in (rows[i]["text"], *_references(rows[i]))), scoring.tokenizer)
    run_meteor = scoring.meteor and meteor_available()
    for start in range(0, len(captions), CORPUS_ROWS):
        group = captions[start : start + CORPUS_ROWS]
        corpus, samples, texts = corpus_of(
            [tokens[rows[i]["text"]] for i in group], [[tokens[t] for t in _references(rows[i])] for i in group]
        )
        for index, value in zip(group, sample_scores(corpus, samples, texts, meteor=run_meteor)):
            measured.rows[index].value = value
        members = _members(measured.rows, group)
        for key, frequency in zip(members, coco.document_frequencies(corpus, samples, list(members.values()))):
            measured.frequencies.setdefault(key, Counter()).update(frequency)
            measured.samples[key] += len(members[key])
        measured.groups.append((corpus, samples, group))


def _members(rows: Sequence[RowScore], group: list[int]) -> dict[SetKey, list[int]]:
    """SetKey -> the samples of the group (positions in it) that belong to the set."""
    members = defaultdict(list)
    for sample, index in enumerate(group):
        for key in _sets(rows[index]):
            members[key].append(sample)
    return members


def ciders_of(measured: Measured, totals: Measured):
    """(row index, its CIDEr-D per set) of each caption row `measured` holds, given the document frequencies and
    sample counts of all pieces (`totals`)."""
    for corpus, samples, group in measured.groups:
        ciders = {}  # (SetKey, sample) -> its CIDEr-D in that set
        for key, members in _members(measured.rows, group).items():
            scores = coco.ciders(corpus, samples.subset(members), totals.frequencies[key], totals.samples[key])
            ciders.update(zip(((key, s) for s in members), scores))
        for sample, index in enumerate(group):
            keys = _sets(measured.rows[index], every=True)
            yield index, tuple(None if key is None else ciders[key, sample] for key in keys)


def qualities(rows: Iterable[RowScore], scoring: Scoring) -> dict[str, dict]:
    """task -> its quality, from the contributions of all its rows (any order: they are sorted here)."""
    by_task = defaultdict(list)
    for row in sorted(rows, key=lambda r: r.order):
        by_task[row.task].append(row)
    result = {}
    for task, task_rows in by_task.items():
        quality = _quality(task, task_rows, 0, scoring)
        by_field = {}
        for position, name in enumerate(scoring.slices):
            groups = defaultdict(list)
            for row in task_rows:
                if row.groups[position] is not None:
                    groups[row.groups[position]].append(row)
            if groups:
                by_field[name] = {
                    value: _quality(task, groups[value], position + 1, scoring) for value in sorted(groups)
                }
        if by_field:
            quality["slices"] = by_field
        result[task] = quality
    return result


def _kind(task: str) -> str:
    return task if task in ("vqa", "mc") else "caption"


def _state(row: dict) -> str:
    if row.get("error") is not None:
        return ERROR
    return SCORED if _references(row) else UNSCORED


def _meta(row: dict) -> dict:
    try:
        meta = json.loads(row.get("meta") or "{}")
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _group(value) -> str | None:
    if value is None:
        return None
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _references(row: dict) -> list[str]:
    return row.get("references") or ([row["reference"]] if row.get("reference") is not None else [])


def _sets(row: RowScore, every: bool = False) -> list:
    """The caption sets the row belongs to: the whole task's, then its slice of each field; with `every`, None
    in place of a field the row has no value of (so that positions line up with RowScore.ciders)."""
    keys = [(row.task, None, None)]
    for name_index, value in enumerate(row.groups):
        if value is not None:
            keys.append((row.task, name_index, value))
        elif every:
            keys.append(None)
    return keys


def _quality(task: str, rows: list[RowScore], position: int, scoring: Scoring) -> dict:
    """The quality of one set of a task's rows; `position`: 0 for the whole task, 1 + i for a slice of field i
    (which of each row's CIDEr-D scores belongs to this set)."""
    scored = [r for r in rows if r.state == SCORED]
    quality = {
        "task": task,
        "samples": len(rows),
        "errors": sum(r.state == ERROR for r in rows),
        "unscored": sum(r.state == UNSCORED for r in rows),
        "metrics": {},
        "notes": [],
    }
    kind = _kind(task)
    if kind == "vqa":
        humans = [r.value[1] for r in scored if r.value[0]]
        others = [r.value[1] for r in scored if not r.value[0]]
        if humans:
            quality["vqa_convention"] = scoring.vqa_convention
            quality["notes"].append(VQA_CONVENTION_NOTES[scoring.vqa_convention])
            quality["metrics"]["VQA accuracy"] = fmean(humans)
        if others:
            quality["metrics"]["exact match"] = fmean(others)
        if humans and others:
            quality["notes"].append(
                f"VQA accuracy over the {len(humans)} rows with {VQA_HUMANS} answers, exact match over the "
                f"{len(others)} others"
            )
    elif kind == "mc":
        if scored:
            quality["metrics"]["accuracy"] = fmean(r.value[1] for r in scored)
        quality["metrics"]["unparsed"] = sum(r.value[0] for r in scored)
    else:
        captions = set_scores(
            [r.value for r in scored], [r.ciders[position] for r in scored], scoring.tokenizer, scoring.meteor
        )
        quality["tokenizer"] = captions.tokenizer
        quality["metrics"].update(captions.scores)
        quality["notes"] += [f"tokens: {TOKENIZERS[captions.tokenizer]}", *captions.notes]
    return quality
