"""Command line of the pipeline jobs: a YAML config plus `--set key=value` overrides."""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, load_config
from pipeline.job import JobFailed, run_job
from pipeline.sink import ResumeConflict

DEFAULT_CONFIGS = {"caption": "configs/demo.yaml", "vqa": "configs/demo-vqa.yaml", "mc": "configs/demo-mc.yaml"}


def main(task: str, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m jobs.{task}",
        description=f"Run the {task} job: image shards -> speculative decoding -> Parquet with per-sample metrics.",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIGS[task], help="YAML job config (default: %(default)s)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set decode.max_new_tokens=32 (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, [f"task.kind={task}", *args.set])
        run_job(config)
    except (ConfigError, ResumeConflict) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except JobFailed as exc:
        print(f"job failed: {exc}", file=sys.stderr)
        return 1
    return 0
