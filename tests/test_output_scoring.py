"""Scoring a job's output shard file by shard file in parallel processes gives score_rows's numbers on all of its
rows at once, to the last bit, and reads what scoring needs."""

from __future__ import annotations

import json
import random
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import score
from specvlm.evaluation import quality as quality_module
from specvlm.evaluation.output_scoring import score_output
from specvlm.evaluation.quality import Scoring, score_rows

VOCABULARY = "a an the red blue dog cat sits on of in with man woman table two (left) Mr. it's “big” café"
WORDS = VOCABULARY.split()
FILES, ROWS_PER_FILE = 6, 40


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) + rng.choice(["", "."])


def _rows(seed: int = 0) -> list[dict]:
    """Captions (some sharing references across files, some failed or without references), VQA and choice rows,
    with slice metadata, in an order that is not (shard, key) order."""
    rng = random.Random(seed)
    shared = [_sentence(rng) for _ in range(5)]
    rows = []
    for n in range(FILES * ROWS_PER_FILE):
        kind = ("caption", "caption", "vqa", "mc")[n % 4]
        row = {"shard_id": f"s{rng.randint(0, 3)}", "key": f"{rng.randint(0, 10**6):07d}", "task": kind}
        row |= {"error": None, "prompt": None, "meta": json.dumps({"size": rng.choice([1, 2, 3]), "tag": [n % 3]})}
        if kind == "caption":
            references = [rng.choice(shared + [_sentence(rng)]) for _ in range(rng.randint(1, 5))]
            row |= {"text": rng.choice([_sentence(rng), references[0]]), "references": references}
        elif kind == "vqa":
            answers = [rng.choice(["yes", "no", "Two", "2"]) for _ in range(rng.choice([1, 10]))]
            row |= {"text": rng.choice(["yes", "2", "blue."]), "references": answers}
        else:
            row |= {"text": f"the answer is {rng.choice('abcde')}.", "references": [rng.choice("abc")]}
            row["prompt"] = "which? (a) red (b) blue (c) green"
        row["reference"] = row["references"][0]
        if n % 17 == 0:
            row |= {"error": "decoding failed", "text": None}
        elif n % 19 == 0:
            row |= {"reference": None, "references": None}
        rows.append(row)
    return rows


def _write(folder, rows: list[dict]) -> str:
    folder.mkdir()
    for i in range(FILES):
        chunk = rows[i * ROWS_PER_FILE : (i + 1) * ROWS_PER_FILE]
        pq.write_table(pa.Table.from_pylist(chunk), folder / f"{i:05d}.parquet")
    (folder / "_staging").mkdir()  # a job's unfinished files: not output
    pq.write_table(pa.Table.from_pylist(rows[:3]), folder / "_staging" / "00000.parquet")
    return str(folder)


def _serial(rows: list[dict], scoring: Scoring) -> dict:
    tasks = sorted({r["task"] for r in rows})
    settings = {"meteor": scoring.meteor, "tokenizer": scoring.tokenizer, "vqa_convention": scoring.vqa_convention}
    return {task: score_rows([r for r in rows if r["task"] == task], scoring.slices, **settings) for task in tasks}


def test_parallel_scoring_equals_serial_scoring_to_the_last_bit(tmp_path, monkeypatch):
    # Here caption rows are counted in corpora of 7 rows; the worker processes count theirs in the default ones.
    monkeypatch.setattr(quality_module, "CORPUS_ROWS", 7)
    rows = _rows()
    output = _write(tmp_path / "out", rows)
    scoring = Scoring(("size", "tag"), meteor=False, tokenizer="ptb-python")
    expected = _serial(rows, scoring)
    assert expected["caption"]["slices"]["size"].keys() == {"1", "2", "3"}  # slices with their own CIDEr sets
    assert expected["caption"]["errors"] > 0 and expected["caption"]["unscored"] > 0
    for processes in (1, 3):
        quality, scored = score_output(output, scoring, processes=processes)
        assert scored == len(rows)
        assert quality == expected  # every metric of every task and slice, float for float


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and the PTB tokenizer are Java programs")
def test_parallel_scoring_with_java_tokens_and_meteor_equals_serial(tmp_path):
    rows = [r for r in _rows(1) if r["task"] == "caption"][:60]
    output = tmp_path / "out"
    output.mkdir()
    for i in range(3):
        pq.write_table(pa.Table.from_pylist(rows[i * 20 : (i + 1) * 20]), output / f"{i:05d}.parquet")
    scoring = Scoring(("size",), meteor=True, tokenizer="ptb-java")
    quality, _ = score_output(str(output), scoring, processes=2)
    assert "METEOR" in quality["caption"]["metrics"]
    assert quality == _serial(rows, scoring)


def test_score_names_a_letter_past_the_prompts_choices_unparsed(tmp_path):
    # The prompt is read with the rows: with three choices, "d" is no answer.
    rows = [
        {"shard_id": "s", "key": "1", "task": "mc", "text": "the answer is d.", "reference": "d", "error": None},
        {"shard_id": "s", "key": "2", "task": "mc", "text": "the answer is b.", "reference": "b", "error": None},
    ]
    output = tmp_path / "out"
    output.mkdir()
    prompt = "which colour? (a) red (b) blue (c) green"
    pq.write_table(pa.Table.from_pylist([{**r, "prompt": prompt, "meta": None} for r in rows]), output / "0.parquet")
    assert score.main([str(output), "--report", str(tmp_path / "report"), "--processes", "1"]) == 0
    quality = json.loads((tmp_path / "report" / "metrics.json").read_text())["quality"]["mc"]
    assert quality["metrics"] == {"accuracy": 0.5, "unparsed": 1}


def test_a_chunk_that_fails_in_a_worker_process_raises_its_error_in_the_parent(tmp_path):
    output = _write(tmp_path / "out", _rows())
    (tmp_path / "out" / "00004.parquet").write_bytes(b"PAR1 not a parquet file PAR1")
    with pytest.raises((OSError, ValueError), match=r"00004\.parquet|Parquet"):
        score_output(output, Scoring(meteor=False, tokenizer="ptb-python"), processes=3)
