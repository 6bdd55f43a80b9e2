"""Score an existing output again, without a model: task quality from the Parquet alone, in seconds.

python -m jobs.score out/evaluate-demo                # an evaluation's output: its whole report, rebuilt
python -m jobs.score out/demo-vqa --slice kind        # one job's output: its quality, overall and per slice
python -m jobs.score out/demo-vqa --report out/score  # ... also written as report.md and metrics.json
python -m jobs.score out/demo-vqa --vqa-convention official    # VQA accuracy as the VQA authors' script gives it
python -m jobs.score out/captions --processes 8       # a job's output, shard files scored in 8 processes

A job's output is scored a few shard files at a time in worker processes (one per CPU by default), to the same
numbers as one process gives.

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
from specvlm.evaluation.output_scoring import default_processes, score_output
from specvlm.evaluation.ptb import TOKENIZERS
from specvlm.evaluation.quality import Scoring
from specvlm.evaluation.report import (
    Run,
    build_report,
    quality_markdown,
    read_index,
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
    parser.add_argument(
        "--processes",
        type=int,
        default=default_processes(),
        help="worker processes scoring a job's output, a few shard files each (default: the CPUs, %(default)s; an "
        "evaluation's output is scored in this process)",
    )
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be 1 or more")
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
        scoring = Scoring(
            tuple(args.slice or ()), not args.no_meteor, args.tokenizer, args.vqa_convention or "lmms-eval"
        )
        quality, rows = score_output(args.output, scoring, processes=args.processes)
    except (OSError, ValueError) as exc:
        print(f"error: cannot score {args.output}: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: {args.output} holds no output rows (*.parquet); is it a job's output?", file=sys.stderr)
        return 2
    print(quality_markdown(quality))
    if args.report:
        print(f"written: {write_quality_report(quality, args.report)} and metrics.json beside it")
    print(f"scored {rows} rows in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
