"""Score an existing output again, without a model: task quality from the Parquet alone, in seconds.

python -m jobs.score out/evaluate-demo                # an evaluation's output: its whole report, rebuilt
python -m jobs.score out/demo-vqa --slice kind        # one job's output: its quality, overall and per slice
python -m jobs.score out/demo-vqa --report out/score  # ... also written as report.md and metrics.json
python -m jobs.score out/demo-vqa --vqa-convention official    # VQA accuracy as the VQA authors' script gives it

An evaluation's output is scored with the convention and tokenizer its config named (in evaluation.json),
unless --vqa-convention or --tokenizer say otherwise.

Object storage is reached through the standard credential chains and settings (AWS_ENDPOINT_URL, ~/.aws).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from specvlm.evaluation.answers import VQA_CONVENTIONS
from specvlm.evaluation.ptb import TOKENIZERS
from specvlm.evaluation.quality import score_rows
from specvlm.evaluation.report import (
    Run,
    build_report,
    quality_markdown,
    read_index,
    read_output,
    write_quality_report,
    write_report,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="a job's output, or an evaluation's (the folder holding evaluation.json)")
    parser.add_argument("--slice", action="append", default=None, metavar="FIELD", help="metadata field (repeatable)")
    parser.add_argument("--report", type=Path, help="folder for report.md and metrics.json")
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (a Java program, seconds to start)")
    parser.add_argument(
        "--vqa-convention",
        choices=VQA_CONVENTIONS,
        help="VQA accuracy as lmms-eval or the VQA authors' vqaEval.py computes it (default: the evaluation's, "
        "else lmms-eval)",
    )
    parser.add_argument(
        "--tokenizer",
        choices=list(TOKENIZERS),
        help="caption tokens: pycocoevalcap's Java PTB tokenizer or its Python reproduction (default: the "
        "evaluation's, else ptb-java where Java is)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        index = read_index(args.output)
        if index is not None:
            slices = index["slices"] if args.slice is None else args.slice
            report = build_report(
                [Run(**r) for r in index["runs"]],
                slices,
                meteor=not args.no_meteor,
                tokenizer=args.tokenizer or index.get("caption_tokenizer"),
                vqa_convention=args.vqa_convention or index.get("vqa_convention", "lmms-eval"),
            )
            path = write_report(report, args.report or Path(index["report_dir"]))
            print(path.read_text())
            print(f"written: {path} and metrics.json beside it ({time.perf_counter() - started:.1f} s)")
            return 0 if report.all_match else 1
        rows = read_output(args.output)
    except (OSError, ValueError) as exc:
        print(f"error: cannot score {args.output}: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: {args.output} holds no output rows (*.parquet); is it a job's output?", file=sys.stderr)
        return 2
    by_task = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    scoring = {
        "meteor": not args.no_meteor,
        "tokenizer": args.tokenizer,
        "vqa_convention": args.vqa_convention or "lmms-eval",
    }
    quality = {task: score_rows(task_rows, args.slice or (), **scoring) for task, task_rows in by_task.items()}
    print(quality_markdown(quality))
    if args.report:
        print(f"written: {write_quality_report(quality, args.report)} and metrics.json beside it")
    print(f"scored {len(rows)} rows in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
