"""The job command line as a user meets it: exit codes, and what a failure prints."""

import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from pipeline.config import load_config
from pipeline.evaluation_run import load_evaluate_config

DEMO_MODELS = Path("assets/demo/models")


def run_cli(*args, cwd=None, timeout=300, program=sys.executable):
    return subprocess.run([program, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


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


def test_the_specvlm_command_runs_a_job_from_outside_the_project(tmp_path):
    """From a scratch folder: the config's own paths resolve against its folder, --set paths against the current
    directory; Ray's progress bars stay off the console, and the summary ends with where the output went."""
    specvlm = Path(sys.executable).parent / "specvlm"
    config = Path("configs/demo.yaml").resolve()
    result = run_cli(
        "caption",
        "--config",
        str(config),
        "--set",
        "input.max_shards=1",
        "--set",
        "output.uri=out/caption",
        cwd=tmp_path,
        program=specvlm,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in (tmp_path / "out" / "caption").glob("*.parquet")] == ["00000.parquet"]
    assert "1 shards, 0 already written, 1 to do" in result.stdout
    assert result.stdout.rstrip().endswith("output: out/caption (manifest: out/caption/_manifest.json)")
    assert "Total Progress" not in result.stdout + result.stderr  # Ray Data's progress lines
    assert "Started a local Ray instance" not in result.stderr and "core_worker" not in result.stderr

    module = run_cli("-m", "jobs.vqa", "--help", cwd=tmp_path, timeout=120)
    assert module.returncode == 0 and "--retry-errors" in module.stdout


def test_relative_paths_in_a_config_file_resolve_against_its_folder(tmp_path, monkeypatch):
    (tmp_path / "project" / "configs").mkdir(parents=True)
    (tmp_path / "project" / "models" / "target").mkdir(parents=True)
    config_file = tmp_path / "project" / "configs" / "job.yaml"
    config_file.write_text(
        "input: {uri: ../annotations/captions.json, format: coco, images: ../images}\n"
        "output: {uri: ../out/job}\n"
        "model: {target: ../models/target}\n"
        "draft: {kind: text, path: org/draft-model}\n"  # no such folder: a Hugging Face model id, kept as it is
    )
    monkeypatch.chdir(tmp_path)
    config = load_config("project/configs/job.yaml")
    assert (config.input.uri, config.input.images) == ("project/annotations/captions.json", "project/images")
    assert (config.output.uri, config.model.target) == ("project/out/job", "project/models/target")
    assert config.draft.path == "org/draft-model"
    overridden = load_config("project/configs/job.yaml", ["output.uri=here/out", "draft.path=drafts/text"])
    assert (overridden.output.uri, overridden.draft.path) == ("here/out", "drafts/text")  # --set: from the cwd

    absolute = load_config(None, [f"output.uri={tmp_path}/o", "input.uri=s3://bucket/x/*.tar", "model.target=m"])
    assert (absolute.output.uri, absolute.input.uri) == (f"{tmp_path}/o", "s3://bucket/x/*.tar")


def test_compile_on_and_off_unquoted_are_the_choices_not_booleans(tmp_path):
    """YAML reads on/off as booleans; the field means the words, from a --set and from a file alike."""
    base = [f"output.uri={tmp_path}/o", "input.uri=in/*.tar", "model.target=m"]
    assert load_config(None, [*base, "compute.compile=on"]).compute.compile == "on"
    assert load_config(None, [*base, "compute.compile=off"]).compute.compile == "off"
    config_file = tmp_path / "job.yaml"
    config_file.write_text("compute: {compile: on}\n")
    assert load_config(str(config_file), base).compute.compile == "on"


def test_the_evaluation_config_resolves_its_paths_and_overrides_against_its_folder(tmp_path, monkeypatch):
    repo = Path.cwd()
    monkeypatch.chdir(tmp_path)
    config = load_evaluate_config(str(repo / "configs" / "evaluate-demo.yaml"))
    assert Path(config.job).resolve() == repo / "configs" / "demo.yaml"
    coco = dict(s.split("=", 1) for s in config.tasks["caption (COCO)"])
    assert Path(coco["input.uri"]).resolve() == repo / "assets/demo/benchmark/annotations/captions_world1.json"
    assert Path(coco["input.uri"]).exists() and coco["task.kind"] == "caption"
    vlm = dict(s.split("=", 1) for s in config.strategies["vlm chain γ=5"])
    assert Path(vlm["draft.path"]).resolve() == repo / "assets/demo/models/draft-vlm"


def test_sigterm_stops_a_job_with_one_line_and_no_native_stack_trace(tmp_path):
    out = tmp_path / "out"
    command = ["-m", "jobs.caption", "--set", f"output.uri={out}", "--set", "draft.kind=none"]
    job = subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The decode actor's creation logs a line (to the run's log file) once the job's dataset runs.
        deadline = time.monotonic() + 240
        while job.poll() is None and time.monotonic() < deadline:
            if any("core_worker" in log.read_text() for log in out.glob("_logs/run-*.log")):
                break
            time.sleep(0.2)
        job.send_signal(signal.SIGTERM)
        stdout, stderr = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode == 143, stderr[-2000:]
    assert stderr.strip().splitlines() == [
        "job stopped by signal SIGTERM: the shards written are kept; run the same command to finish the others"
    ]
    assert "SIGTERM received" not in stdout + stderr and "Aborted" not in stdout + stderr
    assert not list(out.glob("*.parquet"))  # stopped while decoding, before any shard was complete
    logs = list((out / "_logs").glob("run-*.log"))
    assert f"messages from Ray and the libraries go to {logs[0]}" in stdout


def test_a_preflight_error_is_one_line_exit_2_and_leaves_no_run_log(tmp_path):
    """The override the demo config suggests, without the matching draft.path: refused before Ray starts."""
    out = tmp_path / "out"
    result = run_cli("-m", "jobs.caption", "--set", "draft.kind=text", "--set", f"output.uri={out}", timeout=120)
    assert result.returncode == 2 and "messages from Ray" not in result.stdout
    assert result.stderr.strip().splitlines() == [
        "error: draft.kind / draft.path: draft 'assets/demo/models/draft-vlm' is a vision-language model (llava), "
        "not a text-only LM; set draft.kind=vlm, or point draft.path at a text-only draft"
    ]
    assert not list(out.glob("_logs/*"))
