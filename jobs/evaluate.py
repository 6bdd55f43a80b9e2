"""Evaluation: the target alone and every draft strategy on the same samples, through the pipeline, with a report of
task quality (stated once, checked for every strategy) and the time each strategy took.

python -m jobs.evaluate                                   # configs/evaluate-demo.yaml
python -m jobs.evaluate --config my-eval.yaml --set compute.actors=4 --output s3://bucket/eval --report out/r
python -m jobs.score OUTPUT                               # the report again, from the outputs, without a model
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.cli import PROJECT, stamp, usable_log_dir
from pipeline.config import ConfigError, load_config
from pipeline.console import stderr_to_file
from pipeline.evaluation_run import load_evaluate_config, run_evaluation, with_locations
from pipeline.job import JobFailed
from specvlm.evaluation.report import build_report, write_report

DEFAULT_CONFIG = os.path.relpath(PROJECT / "configs/evaluate-demo.yaml")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="evaluation config (default: %(default)s)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a job config value in every run (repeatable)",
    )
    parser.add_argument(
        "--output",
        help="where the runs' Parquet and the index go, any fsspec URI (default: --set output.uri, else the "
        "config's output, else out/evaluate-<config name>)",
    )
    parser.add_argument(
        "--report",
        "--report-dir",
        dest="report",
        help="local folder for report.md, metrics.json and the plots (default: the config's, else <output>/report)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show Ray's progress bars and log lines, and its workers' output"
    )
    args = parser.parse_args(argv)
    try:
        config = load_evaluate_config(args.config, args.set)
        name = Path(args.config).stem.removeprefix("evaluate-")
        config, overrides = with_locations(config, name, args.set, args.output, args.report)
        # The run log beside the runs, where a job's goes (pipeline/cli.py): the evaluation's output as the job's.
        job = load_config(config.job, [*overrides, f"output.uri={config.output}"])
        if args.verbose:
            runs = run_evaluation(config, overrides, verbose=True)
        else:  # Ray's and the libraries' messages go to the run log; the console shows the runs and the report
            with stderr_to_file(usable_log_dir(job, "evaluate") / f"evaluate-{stamp()}.log") as log:
                print(f"messages from Ray and the libraries go to {log}")
                runs = run_evaluation(config, overrides, verbose=False)
        storage_options = job.output.storage_options
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except JobFailed as exc:
        print(f"job failed: {exc}", file=sys.stderr)
        return 1
    report = build_report(
        runs,
        config.slices,
        storage_options=storage_options,
        tokenizer=config.caption_tokenizer,
        vqa_convention=config.vqa_convention,
    )
    path = write_report(report, Path(config.report_dir))
    print(path.read_text())
    print(f"written: {path} and metrics.json beside it")
    if not report.all_match:
        print("some strategy's output differs from the target's: see the flagged rows", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
