"""The job command line as a user meets it: exit codes, and what a failure prints."""

import re
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

DEMO_MODELS = Path("assets/demo/models")


def run_cli(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def test_an_error_in_a_ray_worker_is_one_line_naming_its_cause_with_the_traceback_in_a_log(tmp_path):
    # A target whose config and weights pass preflight, but without the processor files its read tasks load.
    target = tmp_path / "target"
    target.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(DEMO_MODELS / "target" / name, target / name)
    out = tmp_path / "out"
    result = run_cli(
        "-m",
        "jobs.caption",
        "--set",
        f"model.target={target}",
        "--set",
        "draft.kind=none",
        "--set",
        f"output.uri={out}",
        "--set",
        "input.max_shards=1",
    )
    failures = [line for line in result.stderr.splitlines() if line.startswith("job failed:")]
    assert result.returncode == 1 and len(failures) == 1, result.stderr[-3000:]
    line = failures[0]
    assert line.startswith("job failed: OSError: Can't load image processor") and "RayTaskError" not in line
    log = Path(re.search(r"\(traceback in (.+)\)$", line).group(1))
    assert log.parent == out / "_logs" and "Traceback (most recent call last)" in log.read_text()


def _raised_in_a_worker():
    """The RayTaskError a worker sends back for an error raised in it."""
    from ray.exceptions import RayTaskError

    try:
        raise OSError("Can't load image processor for 'target'")
    except OSError as exc:
        return RayTaskError("ReadShard", "".join(traceback.format_exception(exc)), exc)


def test_ray_wrapped_errors_are_described_by_their_innermost_cause():
    """Both ways Ray Data surfaces a worker's error: a task's RayTaskError, an actor constructor's ActorDiedError,
    each raised from Ray Data's message-less marker exception."""
    from ray.data.exceptions import SystemException, UserCodeException
    from ray.exceptions import ActorDiedError

    from pipeline.cli import describe_cause

    task_error = _raised_in_a_worker().as_instanceof_cause()
    actor_error = ActorDiedError(_raised_in_a_worker())
    for wrapped, marker in ((task_error, UserCodeException()), (actor_error, SystemException())):
        wrapped.__cause__ = marker
        assert describe_cause(wrapped) == "OSError: Can't load image processor for 'target'"
    assert describe_cause(ValueError("first line\nsecond line")) == "ValueError: first line"
