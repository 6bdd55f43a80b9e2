"""Running a job: check everything, start (or join) Ray, stream shards through the stages, write, summarise.

    preflight (no Ray yet) -> list shards -> skip finished ones -> read tasks (one per shard: read, prepare)
    -> decode actors -> per-shard Parquet files -> manifest and summary; failed shards named at the end

The same code runs on a laptop (embedded local Ray, CPU) and on a cluster (RAY_ADDRESS / `ray job submit`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import itertools
import json
import logging
import os
import platform
import signal
import threading
import time
import typing
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import ConfigError, JobConfig
from pipeline.console import Heartbeat, Progress, duration, quiet_ray
from pipeline.expected_rows import expected_rows
from pipeline.resume import ShardPlan, plan_shards
from pipeline.run_history import RUNS, run_history, run_record
from pipeline.sink import MANIFEST, PARTIAL, OutputDir, ShardCollector
from specvlm.data.error_kinds import kind_of
from specvlm.data.retry import RetryPolicy, describe, filesystem, is_transient, preflight_retry, with_retries
from specvlm.data.sources import ShardError, SourceError, list_input, read_shard
from specvlm.data.tables import check_image_column
from specvlm.specdec.metrics import Pooled

FAILED_SHARDS_LISTED = 10  # in the error message; the manifest lists them all
ERROR_EXAMPLES = 3  # error rows the summary names; the output's error column holds them all


class JobFailed(RuntimeError):
    pass


class JobStopped(BaseException):  # not an Exception: nothing between here and the command line may swallow it
    """The job was told to stop (SIGTERM). The shards written so far are kept; a rerun finishes the others."""


@dataclass
class Summary:
    shards_total: int
    shards_skipped: int  # already written by an earlier run
    shards_written: int
    shards_failed: int  # could not be read (or written) to their end; no output file
    rows: int  # in the whole output
    errors: int
    new_tokens: int
    target_calls: int
    accepted_tokens: int
    proposed_tokens: int
    draft_calls: int
    run_rows: int  # decoded in this run
    run_tokens: int
    run_seconds: float
    error_breakdown: dict[str, int] = field(default_factory=dict)
    error_examples: list[str] = field(default_factory=list)  # "shard_id/key (kind)" of the first error rows
    # c in the rows' mbsu = new_tokens / (target_calls + c * draft_calls): draft/target decode parameters (a ratio of
    # sizes, not the measured cost the benchmark calls c); None when no row drafted.
    mbsu_cost_ratio: float | None = None

    @property
    def error_fraction(self) -> float:
        return self.errors / self.rows if self.rows else 0.0

    @property
    def pooled(self) -> Pooled:
        """The output's metrics pooled (tau, acceptance) the one way every report pools them."""
        return Pooled(
            self.rows, self.new_tokens, self.target_calls, self.draft_calls, self.proposed_tokens, self.accepted_tokens
        )

    def _error_lines(self) -> list[tuple[str, str]]:
        counts = f"{self.errors} ({self.error_fraction:.1%})"
        if not self.errors:
            return [("errors", counts)]
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(self.error_breakdown.items(), key=lambda kv: -kv[1]))
        more = (
            f", ... ({self.errors - len(self.error_examples)} more)" if self.errors > len(self.error_examples) else ""
        )
        return [
            ("errors", f"{counts}: {kinds}"),
            ("error rows, e.g.", ", ".join(self.error_examples) + more),
            ("every error row", "in the output's error column (shard_id, key, message); counts in _manifest.json"),
        ]

    def table(self) -> str:
        rate = lambda x: f"{x / self.run_seconds:.2f}" if self.run_seconds else "-"
        lines = [
            (
                "shards",
                f"{self.shards_total} ({self.shards_written} written now, {self.shards_skipped} already done, "
                f"{self.shards_failed} failed)",
            ),
            ("rows", f"{self.rows}"),
            *self._error_lines(),
            ("new tokens", f"{self.new_tokens}"),
            ("block efficiency (tau)", f"{self.pooled.block_efficiency:.2f}"),
            ("acceptance rate", f"{self.pooled.acceptance_rate:.2f}"),
            ("this run: images/s", rate(self.run_rows)),
            ("this run: tokens/s", rate(self.run_tokens)),
            ("this run: wall time", duration(self.run_seconds)),
        ]
        width = max(len(k) for k, _ in lines)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def preflight(config: JobConfig) -> tuple[OutputDir, ShardPlan, str]:
    """Everything that can be checked before Ray starts: input listing, output writability, models. Returns the
    output directory, the plan of shards (pipeline/resume.py: for an image folder, which shards the output holds
    still match the folder) and the hash that output written by this job carries.

    Object storage is asked with short timeouts here (specvlm.data.retry.filesystem), and a transient fault is
    retried as the job's reads and writes retry it, for a few seconds (retry.preflight_retry): a store that drops a
    connection or two passes, one that refuses, is unreachable or never answers ends the job within seconds, with
    the config field named. The stores come before the models, whose checks import transformers (seconds on their
    own)."""
    i, o = config.input, config.output
    input_retry, output_retry = preflight_retry(i.retry_for_s), preflight_retry(o.retry_for_s)
    listing = _storage_check(
        "input",
        i.uri,
        i.storage_options,
        input_retry,
        lambda: with_retries(
            functools.partial(
                list_input,
                i.uri,
                i.format,
                storage_options=i.storage_options,
                files_per_shard=i.files_per_shard,
                preflight=True,
                **i.model_dump(include={"images", "annotations", "split"}),
            ),
            input_retry,
        ),
    )

    def writable_output() -> OutputDir:
        output = OutputDir(o.uri, o.storage_options, RetryPolicy(budget_s=o.retry_for_s))
        output.check_writable(output_retry)
        return output

    output = _storage_check("output", o.uri, o.storage_options, output_retry, writable_output)
    config_hash = config.output_hash(check_models(config))
    plan = plan_shards(listing, output, config_hash, i.files_per_shard, prompt_rows=bool(config.task.prompts))
    return output, dataclasses.replace(plan, shards=plan.shards[: i.max_shards]), config_hash


def _storage_check(section: str, uri: str, options: dict, retry: RetryPolicy, check):
    """check(), which retries its requests with `retry`; what it still raises, as a ConfigError naming the field."""
    try:
        return check()
    except SourceError as exc:
        raise ConfigError(f"{section}.uri: {exc}") from None
    except Exception as exc:
        fields = f"{section}.uri" + (f", {section}.storage_options.endpoint_url" if "endpoint_url" in options else "")
        if is_transient(exc):
            again = f", also when asked again for {retry.budget_s:g} s" if retry.budget_s else ""
            problem = (
                f"the store holding {uri} did not answer in time or refused the connection{again} ({describe(exc)})"
            )
            advice = "check the endpoint, the network, and that the store is up"
        else:
            problem = f"cannot use {uri}: {describe(exc)}"
            advice = "check the path, the permissions and the storage options"
        raise ConfigError(f"{section}.uri: {problem}; {advice} ({fields})") from None


def check_models(config: JobConfig) -> dict[str, str]:
    """The target (and a model draft) exist, and the draft is of its declared kind and fits the target, from their
    config.json files alone (no weights load); returns fingerprints of their weights."""
    from specvlm.models.checkpoints import ModelLoadError, read_model_config, weights_fingerprint
    from specvlm.models.compat import check_draft_fits, check_target_kind

    locations = {"model.target": config.model.target}
    if config.draft.kind in ("text", "vlm"):  # the config has made sure such a draft has a path
        locations["draft.path"] = config.draft.path
    options = config.model.storage_options

    def read(location: str) -> tuple[dict, str]:
        if "://" in location:  # first ask the store, briefly, whether it answers at all
            fs, path = filesystem(location, options, preflight=True)
            with contextlib.suppress(FileNotFoundError):  # it answered; read_model_config says what is missing
                fs.info(path)
        return read_model_config(location, options), weights_fingerprint(location, options)

    model_configs, weights = {}, {}
    for name, location in locations.items():
        try:
            model_configs[name], fingerprint = with_retries(functools.partial(read, location), preflight_retry())
            if name == "model.target":
                check_target_kind(model_configs[name], location)
            weights["target" if name == "model.target" else "draft"] = fingerprint
        except (ModelLoadError, ConfigError) as exc:
            raise ConfigError(f"{name}: {exc}") from None
        except Exception as exc:
            problem = f"cannot read {location} ({describe(exc)}); check it and model.storage_options"
            raise ConfigError(f"{name}: {problem}") from None
    if "draft.path" in locations:
        try:
            check_draft_fits(
                config.draft.kind, model_configs["draft.path"], model_configs["model.target"], config.draft.path
            )
        except ModelLoadError as exc:
            raise ConfigError(f"draft.kind / draft.path: {exc}") from None
    return weights


# Records of the first pending shard read before Ray starts, to find a task field missing from all of them.
SAMPLE_RECORDS = 16


def check_first_shard(config: JobConfig, shard) -> None:
    """The first shard to decode holds what the job reads, checked in seconds before Ray starts: a Parquet file's
    image column (its schema alone), and the task's prompt fields (vqa: a question; mc: a question and choices)
    in at least one of its first records. A job whose every row would be an error row fails now, not after
    decoding everything."""
    from specvlm.data.prompts import PromptError, instruction, task_fields

    if shard.format == "parquet":
        check = functools.partial(check_image_column, shard, config.input.storage_options, config.input.image_column)
        try:
            with_retries(check, preflight_retry(config.input.retry_for_s))
        except SourceError as exc:
            raise ConfigError(f"input.image_column: {exc}") from None
        except (OSError, ValueError):
            pass  # a file that cannot be read, or is no Parquet: the job names it after finishing the others
    if config.task.kind == "caption":
        return
    records, problems = [], []
    try:
        for record in itertools.islice(
            read_shard(shard, storage_options=config.input.storage_options, image_column=config.input.image_column),
            SAMPLE_RECORDS,
        ):
            records.append(record)
            try:
                instruction(config.task.kind, task_fields(record, config.input.fields))
                return
            except PromptError as exc:
                problems.append(str(exc))
    except ShardError:
        pass  # the job itself names a shard it cannot read, after finishing the others
    if not records:
        return
    meta = json.loads(records[0]["meta"]) if records[0]["meta"] else {}
    hint = f"its metadata holds {', '.join(sorted(meta))}" if isinstance(meta, dict) and meta else "no metadata"
    raise ConfigError(
        f"task.kind={config.task.kind}: none of the first {len(records)} records of shard {shard.shard_id} "
        f"({shard.uri}) has what the task needs ({problems[0]}); {hint}. Check task.kind, or name the record's "
        "field with input.fields (e.g. --set input.fields.question=FIELD)"
    )


class Plan(typing.NamedTuple):
    """What a run will do, known before Ray starts: the checked output, the plan of shards and the output's hash
    (from preflight), the shards already written, those of them redone for their error rows, and those to decode."""

    output: OutputDir
    shard_plan: ShardPlan
    config_hash: str
    done: set[str]
    redo: set[str]
    pending: list

    def line(self, retry_errors: bool) -> str:
        again = f" ({len(self.redo)} with error rows, redone)" if retry_errors else ""
        shards = len(self.shard_plan.shards)
        return f"{shards} shards, {len(self.done)} already written{again}, {len(self.pending)} to do"


def plan_job(config: JobConfig, retry_errors: bool = False) -> Plan:
    """Preflight, then what is left to do; raises ConfigError (or ResumeConflict) before any work."""
    output, shard_plan, config_hash = preflight(config)
    done = output.finished(config_hash) & {s.shard_id for s in shard_plan.shards}
    redo = output.shards_with_errors(done) if retry_errors else set()
    pending = [s for s in shard_plan.shards if s.shard_id not in done - redo]
    if pending:
        check_first_shard(config, pending[0])
    return Plan(output, shard_plan, config_hash, done, redo, pending)


def count_rows(config: JobConfig):
    """count(shard, limit): the records of a shard, up to limit (0 for a shard that cannot be read: the job names
    it after finishing the others)."""
    from pipeline import compiling

    def count(shard, limit: int) -> int:
        try:
            records = read_shard(
                shard, storage_options=config.input.storage_options, image_column=config.input.image_column
            )
            return compiling.first_rows(records, limit)
        except ShardError:
            return 0

    return count


def init_ray(config: JobConfig, verbose: bool = True) -> None:
    """Join the cluster (ray.address or RAY_ADDRESS), else start an embedded local Ray. Not verbose: Ray's own
    INFO and WARNING lines and the workers' output stay in the session's log files, off the console."""
    import ray

    from pipeline import local_ray

    if ray.is_initialized():
        return
    options = {} if verbose else {"logging_level": logging.ERROR, "log_to_driver": False}
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **options)
    else:
        local_ray.start(config.ray.num_cpus, **options)


@contextlib.contextmanager
def stop_on_sigterm():
    """While the block runs, SIGTERM raises JobStopped. Ray's native failure handler, which ray.init() installs,
    answers it with a C++ stack trace and an abort: a job told to stop has not crashed."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(signum, frame):
    raise JobStopped(f"stopped by signal {signal.Signals(signum).name}")


def build_dataset(config: JobConfig, shards: list, config_hash: str, reports=None):
    import ray

    from pipeline.reader import BLOCK_ROWS, READ_TASK_CPUS, ShardDatasource
    from pipeline.stages import decode_stage

    c = config.compute
    # Read tasks over groups of shards (pipeline/reader.py says why a datasource, and why groups); at most
    # shards_per_actor of them per decode actor at once, each reading one shard at a time, which bounds the shards
    # in flight, and so what a crash can lose.
    reading = min(len(shards), c.actors * c.shards_per_actor)
    source = ShardDatasource(shards, config, readers=reading)
    # Ray Data's reservations split a small node's CPUs between the operators: beside a 1-CPU decode actor and the
    # re-cutting below, a 2-CPU node gave the read a budget of one task however small (measured: 4 read tasks of
    # 0.5 CPU, concurrency 2, ran one after another), so one read stuck on a slow store stalled the job. The
    # read's `concurrency` and the actors' tasks in flight bound what each operator holds without them.
    ray.data.DataContext.get_current().op_resource_reservation_enabled = False
    ds = ray.data.read_datasource(
        source,
        concurrency=reading,
        override_num_blocks=len(source.groups),
        num_cpus=READ_TASK_CPUS,
    )
    # Blocks of BLOCK_ROWS rows, whatever the size of a row or a shard: each decode actor holds a fixed number of
    # blocks, so the rows in flight, and what a crash can lose, are bounded in rows (reader.py).
    ds = ds.repartition(target_num_rows_per_block=BLOCK_ROWS)
    return decode_stage(ds, config, config_hash, reports)


def run_job(
    config: JobConfig, *, log=print, retry_errors: bool = False, verbose: bool = True, messages: str | None = None
) -> Summary:
    """Run the job to completion. Raises ConfigError before any work; JobFailed at the end when shards failed or
    the error rows pass the limit, after every other shard is written. retry_errors: shards whose files hold error
    rows are decoded again (and their files replaced), as if they had not been written. verbose=False: Ray's
    progress bars and log lines stay off the console (pipeline/console.py); `log` gets a progress line instead.
    messages: where the process's other output goes (the command line's run log), named once Ray starts.
    While nothing else is logged, a heartbeat line says what the job is doing (pipeline/console.py)."""
    with Heartbeat(log) as heartbeat:
        return _run_job(config, heartbeat, retry_errors, verbose, messages)


def _run_job(config: JobConfig, heartbeat: Heartbeat, retry_errors: bool, verbose: bool, messages: str | None):
    log = heartbeat.log
    started_at = datetime.datetime.now(datetime.timezone.utc)
    plan = plan_job(config, retry_errors)
    output, shard_plan, config_hash, done, redo, pending = plan
    shards = shard_plan.shards
    log(plan.line(retry_errors))
    for line in shard_plan.report(output.uri):
        log(line)
    shard_plan.set_aside_superseded(output)

    started = time.perf_counter()
    collector = ShardCollector(output, config_hash, output.partial_shards() if pending else set())
    operating_points, compile_reason = {}, "nothing to decode"
    if pending:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from pipeline import compiling
        from pipeline.stages import OperatingPoints, gpus_per_actor

        if messages:
            log(f"messages from Ray and the libraries go to {messages}")
        if not verbose:
            quiet_ray()
        heartbeat.phase("starting Ray" if not (config.ray.address or os.environ.get("RAY_ADDRESS")) else "joining Ray")
        init_ray(config, verbose)
        # On the driver's node: a worker node lost mid-run must not take the job's report of operating points.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        reports = ray.remote(OperatingPoints).options(num_cpus=0, scheduling_strategy=here).remote()
        heartbeat.phase("choosing compute.compile")
        # Memoised: the compile decision and the rows expected both count the first shard, which is read once.
        count = functools.lru_cache(count_rows(config))
        config, compile_reason = compiling.resolve(config, pending, gpus_per_actor(config), count)
        log(f"compiled decode steps: {config.compute.compile} ({compile_reason})")
        dataset = build_dataset(config, pending, config_hash, reports)
        progress = Progress(len(pending), expected_rows(config, pending, count), log)
        compiles = ", compiling their decode steps" if config.compute.compile == "on" else ""
        heartbeat.phase(
            f"loading models on {config.compute.actors} decode actor(s){compiles}, waiting for the first rows"
        )
        shards_so_far = lambda: (
            f"{progress.rows} rows so far, {len(collector.written) + len(collector.failed)}/{len(pending)} shards"
        )
        with stop_on_sigterm():
            for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                heartbeat.phase("decoding, waiting for the next rows", shards_so_far)
                collector.add(batch)
                progress.add(batch, len(collector.written) + len(collector.failed), collector.row_counts)
        heartbeat.phase("writing the last shards and the manifest", shards_so_far)
        collector.close()
        operating_points = ray.get(reports.get.remote())
    elapsed = time.perf_counter() - started

    summary = _summarise(output, shards, len(done - redo), collector, elapsed)
    manifest = _manifest(config, config_hash, summary, collector, operating_points, compile_reason, shard_plan)
    this_run = run_record(started_at, elapsed, summary.run_rows, summary.shards_written, config_hash)
    log(summary.table())  # first: a manifest that cannot be written leaves what the run did in view
    failures = []
    try:
        manifest[RUNS] = run_history(output, this_run)
        output.write_manifest(manifest)
    except Exception as exc:  # the store's outage outlasted output.retry_for_s, a full disk, a refused write
        failures.append(_manifest_failed_message(output, summary, exc))
    else:
        output.clean_staging()
        log(f"output: {output.uri} (manifest: {output.uri}/{MANIFEST})")
    if collector.failed:
        failures.append(_failed_shards_message(collector.failed, collector.kept_partial, output))
    if failures:
        raise JobFailed("\n".join(failures))
    if summary.error_fraction > config.output.max_error_fraction:
        raise JobFailed(
            f"{summary.errors} of {summary.rows} rows failed ({summary.error_fraction:.1%}), over "
            f"output.max_error_fraction={config.output.max_error_fraction:.1%}; see the error column of "
            f"{output.uri} (error_breakdown in its _manifest.json). Fix the cause, then run the same command with "
            "--retry-errors: the shards holding error rows are decoded again"
        )
    return summary


def _manifest_failed_message(output: OutputDir, summary: Summary, exc: Exception) -> str:
    """Why the manifest is missing, and why nothing else is: a rerun finds finished shards by their own files
    (OutputDir.finished reads each file's config hash, never the manifest)."""
    return (
        f"the run's manifest could not be written to {output.uri}/{MANIFEST} ({describe(exc)}; retried for "
        f"output.retry_for_s={output.retry.budget_s:g} s). The {summary.shards_written} shard file(s) this run "
        f"wrote are complete and in place beside the {summary.shards_skipped} written before, and a rerun finds "
        "them by their files, not by the manifest. Fix the cause (the store, its permissions or the free space at "
        "output.uri), then run the same command again: it skips the finished shards, decodes only what is left and "
        "writes the manifest."
    )


def _failed_shards_message(failed: dict[str, str], kept_partial: set[str], output: OutputDir) -> str:
    """kept_partial: the failed shards whose rows read so far are in _partial/ (a shard that failed before its
    first row, or whose rows could not be written, kept none)."""
    listed = sorted(failed)[:FAILED_SHARDS_LISTED]
    lines = [f"{len(failed)} shard(s) could not be finished and have no output file:"]
    lines += [f"  {shard}: {failed[shard]}" for shard in listed]
    if len(failed) > len(listed):
        lines.append(f"  ... and {len(failed) - len(listed)} more (all are listed in {output.uri}/_manifest.json)")
    if kept_partial:
        lines.append(
            f"The rows {len(kept_partial)} of them did yield are kept apart in {output.uri}/{PARTIAL}/ (not part of "
            "the output)."
        )
    lines.append(
        "Fix the cause, then run the same command again: finished shards are skipped and only these are retried."
    )
    return "\n".join(lines)


def _summarise(output: OutputDir, shards, skipped: int, collector: ShardCollector, elapsed: float) -> Summary:
    numbers = ["new_tokens", "target_calls", "draft_calls", "accepted_tokens", "proposed_tokens"]
    table = output.read_all(["shard_id", "key", "error", "mbsu", *numbers])
    ids = {s.shard_id for s in shards}
    table = table.filter(pc.is_in(table["shard_id"], value_set=pa.array(sorted(ids))))
    total = {n: int(pc.sum(table[n]).as_py() or 0) for n in numbers}
    error_rows = table.filter(pc.is_valid(table["error"])).select(["shard_id", "key", "error"]).to_pylist()
    errors = [row["error"] for row in error_rows]
    breakdown: dict[str, int] = {}
    for message in errors:
        kind = kind_of(message)
        breakdown[kind] = breakdown.get(kind, 0) + 1
    examples = [f"{r['shard_id']}/{r['key']} ({kind_of(r['error'])})" for r in error_rows[:ERROR_EXAMPLES]]
    run_rows = sum(collector.written.values())
    return Summary(
        shards_total=len(shards),
        shards_skipped=skipped,
        shards_written=len(collector.written),
        shards_failed=len(collector.failed),
        rows=table.num_rows,
        errors=len(errors),
        run_rows=run_rows,
        run_tokens=collector.tokens,
        run_seconds=elapsed,
        error_breakdown=breakdown,
        error_examples=examples,
        mbsu_cost_ratio=_mbsu_cost_ratio(table),
        **total,
    )


def _mbsu_cost_ratio(table: pa.Table) -> float | None:
    """The c the rows' mbsu used, recovered from a row that drafted: c = (new_tokens / mbsu - target_calls) /
    draft_calls."""
    drafted = table.filter(pc.and_(pc.greater(table["draft_calls"], 0), pc.greater(table["mbsu"], 0)))
    if drafted.num_rows == 0:
        return None
    row = drafted.slice(0, 1).to_pylist()[0]
    return round((row["new_tokens"] / row["mbsu"] - row["target_calls"]) / row["draft_calls"], 6)


def _manifest(
    config: JobConfig,
    config_hash: str,
    summary: Summary,
    collector: ShardCollector,
    operating_points: dict,
    compile_reason: str,
    plan: ShardPlan,
) -> dict:
    import ray
    import torch
    import transformers

    import specvlm

    return {
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "config_hash": config_hash,
        "model": config.model.target,
        "draft": config.draft.label,
        "task": config.task.kind,
        "input": config.input.uri,
        "shards_written_this_run": collector.written,
        "failed_shards": collector.failed,  # shard id -> why; a rerun retries exactly these
        **plan.manifest(),
        "most_shards_held_at_once": collector.peak_open,  # what a driver crash at the worst moment would have lost
        # Per decode actor: the running batch it settled on, the speculation controller's measured costs, and
        # what compiling cost it (under "compile": graphs, warm-up seconds, a fall-back to eager if any).
        "operating_points": operating_points,
        "compile": {"decode_steps": config.compute.compile, "why": compile_reason},
        "summary": {
            **summary.__dict__,
            "error_fraction": summary.error_fraction,
            "block_efficiency": summary.pooled.block_efficiency,
            "acceptance_rate": summary.pooled.acceptance_rate,
        },
        "versions": {
            "specvlm": specvlm.__version__,
            "torch": torch.__version__,
            "ray": ray.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }
