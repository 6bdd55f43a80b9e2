"""Command line of the pipeline jobs: a YAML config plus `--set key=value` overrides.

Exit codes: 0 done; 2 the config, the inputs or the models are wrong (found before any work, the field named);
1 the job ran and failed. An unexpected error, in the driver or in a Ray worker, reaches the user as one line
naming its innermost cause; its full traceback goes to a log file that the line names.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import traceback
from pathlib import Path

from pipeline.config import ConfigError, JobConfig, load_config
from pipeline.console import stderr_to_file
from pipeline.job import JobFailed, JobStopped, run_job
from pipeline.sink import ResumeConflict

# The demo configs, by their path in the project. The default --config is that file as a path from the current
# directory: `configs/demo.yaml` from the project root, and still the demo from anywhere else.
DEFAULT_CONFIGS = {"caption": "configs/demo.yaml", "vqa": "configs/demo-vqa.yaml", "mc": "configs/demo-mc.yaml"}
PROJECT = Path(__file__).resolve().parents[1]
LOG_DIR = Path("out/logs")  # for jobs whose output is not a local folder
LOGS = "_logs"  # inside a local output folder (readers of the output skip names starting with "_")
RAISED_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b.*?: ")  # "OSError: ..."


def main(task: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or f"python -m jobs.{task}",
        description=f"Run the {task} job: image shards -> speculative decoding -> Parquet with per-sample metrics.",
    )
    default_config = os.path.relpath(PROJECT / DEFAULT_CONFIGS[task])
    parser.add_argument("--config", default=default_config, help="YAML job config (default: %(default)s)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set decode.max_new_tokens=32 (repeatable)",
    )
    parser.add_argument(
        "--retry-errors",
        action="store_true",
        help="decode again the shards whose output files hold error rows (after fixing their cause)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show Ray's progress bars and log lines, and its workers' output"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config, the data and the models, print what would run, and exit without starting Ray",
    )
    args = parser.parse_args(argv)
    config = None
    try:
        config = load_config(args.config, [f"task.kind={task}", *args.set])
        if args.dry_run:
            from pipeline.dry_run import dry_run

            print("\n".join(dry_run(config, retry_errors=args.retry_errors)))
        elif args.verbose:
            run_job(config, retry_errors=args.retry_errors, verbose=True)
        else:  # Ray's and the libraries' messages go to a log file; the console shows progress and the summary
            with stderr_to_file(usable_log_dir(config, task) / f"run-{stamp()}.log") as log:
                run_job(config, retry_errors=args.retry_errors, verbose=False, messages=str(log))
    except (ConfigError, ResumeConflict) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except JobFailed as exc:
        print(f"job failed: {exc}", file=sys.stderr)
        return 1
    except (JobStopped, KeyboardInterrupt) as exc:
        what = exc if isinstance(exc, JobStopped) else "interrupted"
        print(f"job {what}: the shards written are kept; run the same command to finish the others", file=sys.stderr)
        return 143 if isinstance(exc, JobStopped) else 130
    except Exception as exc:
        print(unexpected_failure(exc, log_dir(config, task)), file=sys.stderr)
        return 1
    return 0


def log_dir(config: JobConfig | None, name: str) -> Path:
    """Where a failed job's traceback goes: `_logs/` in its output folder when that is a local folder, else out/logs."""
    uri = config.output.uri if config else ""
    if uri and ("://" not in uri or uri.startswith("file://")):
        return Path(uri.removeprefix("file://")) / LOGS
    return LOG_DIR / name


def usable_log_dir(config: JobConfig, name: str) -> Path:
    """log_dir, created; inside a local output folder, a path that cannot be a folder is the config's mistake."""
    folder = log_dir(config, name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        if folder.parent == Path(config.output.uri.removeprefix("file://")):
            raise ConfigError(
                f"output.uri: {config.output.uri} is a file, or lies below one; the output must be a folder "
                "(existing or not): point output.uri at a folder"
            ) from None
        raise
    return folder


def unexpected_failure(exc: BaseException, folder: Path) -> str:
    """Write the traceback to a log file in `folder`; return the one line the user sees."""
    path = folder / f"failure-{stamp()}.log"
    line = f"job failed: {describe_cause(exc)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(exc)))
    except OSError as log_error:
        return f"{line} (its traceback could not be written to {path}: {log_error.strerror})"
    return f"{line} (traceback in {path})"


def stamp() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def describe_cause(exc: BaseException) -> str:
    """The innermost cause of `exc` as one line, `Type: message`.

    Ray wraps an error raised in a worker: a failed task's RayTaskError keeps the original as `cause`; an actor
    whose constructor failed surfaces as ActorDiedError, which keeps only the text of the worker's traceback,
    whose last line is the original error; Ray Data raises either `from` a marker exception without a message."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None)
        if not isinstance(inner, BaseException):
            inner = exc.__cause__
        if inner is None or type(inner).__module__ == "ray.data.exceptions":
            break
        exc = inner
    lines = str(exc).strip().splitlines()
    if type(exc).__module__.startswith("ray."):
        raised = [line for line in lines if RAISED_LINE.match(line)]  # the worker traceback's last line
        if raised:
            return raised[-1]
    return f"{type(exc).__name__}" + (f": {lines[0]}" if lines else "")
