"""How long re-scoring takes: `python -m jobs.score` on a large output, per task, timed as a user runs it.

python -m jobs.score_benchmark                  # 100,000 rows per task
python -m jobs.score_benchmark --rows 10000 --tasks vqa

No model runs: each output is written directly, in the output schema, from distinct demo-world scenes (seed 3,
which nothing else uses), with the references the demo benchmark gives them (specvlm/demo/benchmark.py): five
captions, ten human answers, or the choice letter. The "generated" text is the world's own answer or reasoning,
wrong in one row of seven, and for captions never a reference ("a picture of" the world's caption, or another
scene's caption in the wrong rows), so the scores are not trivial. 1,000 rows per file, like a job's shards.
Every command is timed from its process start to its exit, interpreter start-up included.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.schema import OUTPUT_SCHEMA
from specvlm.demo.benchmark import caption_references, human_answers, question_kind
from specvlm.demo.world import LETTERS, make_scene

SEED = 3
ROWS_PER_FILE = 1000
WRONG_EVERY = 7
SLICE = {"caption": "shapes", "vqa": "answer_type", "mc": "category"}


def write_output(task: str, rows: int, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for first in range(0, rows, ROWS_PER_FILE):
        shard = f"{first // ROWS_PER_FILE:05d}"
        batch = [_row(task, n, shard) for n in range(first, min(rows, first + ROWS_PER_FILE))]
        pq.write_table(pa.Table.from_pylist(batch, schema=OUTPUT_SCHEMA), out / f"{shard}.parquet")


def _row(task: str, n: int, shard: str) -> dict:
    scene, wrong = make_scene(SEED, n, image_size=24), n % WRONG_EVERY == 0  # text only: the smallest image
    if task == "caption":
        references = caption_references(scene)
        # Neither is a reference: a wrong row describes another scene, a right one words this scene its own way.
        text = make_scene(SEED + 1, n, image_size=24).caption if wrong else f"a picture of {scene.caption}"
        meta = {"shapes": len(scene.objects)}
    elif task == "vqa":
        references = human_answers(scene, scene.question, scene.answer)
        kind = question_kind(scene.question)
        text, meta = ("purple." if wrong else scene.answer), {"answer_type": "number" if kind == "count" else "other"}
    else:
        references = [LETTERS[scene.answer_index]]
        letter = LETTERS[(scene.answer_index + wrong) % len(scene.choices)]
        text, meta = scene.reasoning[: -len("a.")] + f"{letter}.", {"category": question_kind(scene.mc_question)}
    return {
        "key": f"{n:08d}",
        "shard_id": shard,
        "source": "score-benchmark",
        "task": task,
        "text": text,
        "reference": references[0],
        "references": references,
        "meta": json.dumps(meta),
        "stop_reason": "eos",
        "model": "none",
        "draft": "none",
        "config_hash": "score-benchmark",
    }


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--tasks", nargs="+", default=list(SLICE), choices=list(SLICE))
    parser.add_argument("--out", type=Path, default=Path("out/score-benchmark"))
    args = parser.parse_args(argv)
    lines = ["| task | rows | command | seconds |", "|---|---:|---|---:|"]
    for task in args.tasks:
        output = args.out / task
        write_output(task, args.rows, output)
        score = [sys.executable, "-m", "jobs.score", str(output)]
        runs = [
            score,
            score + ["--slice", "answer_type" if task == "vqa" else "category" if task == "mc" else "shapes"],
        ]
        if task == "caption":
            runs.insert(0, score + ["--no-meteor"])
        for command in runs:
            shown = " ".join(["python -m jobs.score", str(output), *command[len(score) :]])
            lines.append(f"| {task} | {args.rows} | `{shown}` | {timed(command):.1f} |")
            print(lines[-1], flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
