"""Evaluation: target alone vs every draft strategy on the same samples, through the pipeline, with a report.

python -m jobs.evaluate                                   # configs/evaluate-demo.yaml
python -m jobs.evaluate --config my-eval.yaml --set compute.actors=4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.evaluate import load_evaluate_config, run_evaluation, write_report
from pipeline.job import JobFailed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/evaluate-demo.yaml")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a job config value in every run (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        config = load_evaluate_config(args.config, args.set)
        results = run_evaluation(config, args.set)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except JobFailed as exc:
        print(f"job failed: {exc}", file=sys.stderr)
        return 1
    report = write_report(results, Path(config.report_dir))
    print(report.read_text())
    print(f"written: {report}")
    mismatched = [r for r in results if r.identical < 1.0]
    if mismatched:
        print(f"output differs from the target's for {[(r.task, r.strategy) for r in mismatched]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
