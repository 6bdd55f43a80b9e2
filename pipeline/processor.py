"""Speculative decoding as a Ray Dataset transform, shaped like Ray Data LLM's `build_llm_processor`:

    processor = build_processor(ProcessorConfig(model=..., draft=...), preprocess=..., postprocess=...)
    ds = processor(ray.data.read_parquet(...))          # or from_huggingface, read_delta, your own datasource
    ds.write_parquet(...)                                # or anywhere Ray writes

Rows in: an image column (bytes, a path or URI, a PIL image, a numpy array, or a Hugging Face
{"bytes", "path"} image) plus prompt fields (question, choices, answer, caption; more by `fields`).
Rows out: the columns of the job's output schema (pipeline/schema.py). A bad row becomes a row with `error` set.

`decode_records` is the part every job shares: preprocessing on CPU tasks, then the decode actor pool, over any
Dataset of records. The jobs feed it from shards and keep their resumable, one-file-per-shard output.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import Field, field_validator

from pipeline.config import ComputeConfig, ConfigError, DecodeSettings, JobConfig, Section, TaskConfig, _no_secrets
from pipeline.schema import OUTPUT_SCHEMA
from pipeline.stages import DECODE_BATCH_ROWS, DECODE_TASKS_PER_ACTOR, RECORD_SCHEMA, DecodeActor, preprocess
from specvlm.data.retry import with_retries
from specvlm.engine import DraftSettings, TargetSettings
from specvlm.models.checkpoints import ModelLoadError, check_model_location, weights_fingerprint

TEXT_FIELDS = ("caption", "question", "choices", "answer")
# Columns a row may bring that name it in the output rather than feed the prompt.
IDENTITY_FIELDS = ("key", "shard_id", "source")


class ProcessorConfig(Section):
    """A job config without input and output locations: the Dataset is the input, the caller writes the output."""

    image_column: str = Field("image", description="column holding the image: bytes, path/URI, PIL or numpy")
    fields: dict[Literal["caption", "question", "choices", "answer", "references"], str] = Field(
        default_factory=dict, description="task fields taken from other columns, e.g. {question: mc_question}"
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for images given as URIs (no credentials)"
    )
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: TargetSettings
    draft: DraftSettings = Field(default_factory=DraftSettings)
    decode: DecodeSettings = Field(default_factory=DecodeSettings)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    _check_secrets = field_validator("storage_options")(_no_secrets)

    def job_config(self) -> JobConfig:
        """The JobConfig the shared stages read. Its input and output URIs name no location: nothing is listed
        or written through them."""
        rows = self.model_dump(include={"image_column", "fields", "storage_options"})
        sections = self.model_dump(exclude=set(rows))
        return JobConfig.model_validate(
            {**sections, "input": {"uri": "(dataset)", **rows}, "output": {"uri": "(dataset)"}}
        )


class Processor:
    """Applies preprocessing and speculative decoding to a Ray Dataset: `processor(ds)` -> output rows."""

    def __init__(self, config: JobConfig, config_hash: str, preprocess=None, postprocess=None):
        self.config = config
        self.config_hash = config_hash
        self.preprocess = preprocess
        self.postprocess = postprocess

    def __call__(self, ds):
        if self.preprocess is not None:
            ds = ds.map(self.preprocess)
        i = self.config.input
        ds = ds.map_batches(
            dataset_records,
            fn_kwargs={"image_column": i.image_column, "storage_options": i.storage_options},
            batch_format="pyarrow",
            batch_size=16,
        )
        ds = decode_records(ds, self.config, self.config_hash).select_columns(OUTPUT_SCHEMA.names)
        return ds if self.postprocess is None else ds.map(self.postprocess)


def build_processor(
    config: ProcessorConfig | JobConfig,
    *,
    preprocess: Callable[[dict], dict] | None = None,
    postprocess: Callable[[dict], dict] | None = None,
) -> Processor:
    """A processor for `config` (of a job config, the input section's image_column, fields and storage_options
    are read, its URIs and the output section are not). The models are checked and fingerprinted now, before any
    Ray work, as a job's preflight does; rows carry the same config hash a job writing them would. preprocess /
    postprocess map one row to one row, before and after the stages."""
    job = config.job_config() if isinstance(config, ProcessorConfig) else config
    return Processor(job, job.output_hash(model_fingerprints(job)), preprocess, postprocess)


def model_fingerprints(config: JobConfig) -> dict[str, str]:
    """Check that the target (and a model draft) exist and fingerprint their weights, cheaply (no download).
    Raises ConfigError naming the field."""
    try:
        check_model_location(config.model.target, config.model.storage_options)
        weights = {"target": weights_fingerprint(config.model.target, config.model.storage_options)}
        if config.draft.kind in ("text", "vlm"):
            if not config.draft.path:
                raise ConfigError(f"draft.path: a {config.draft.kind!r} draft needs a model path")
            check_model_location(config.draft.path, config.model.storage_options)
            weights["draft"] = weights_fingerprint(config.draft.path, config.model.storage_options)
    except (ModelLoadError, OSError) as exc:
        raise ConfigError(f"model.target / draft.path: {exc}") from None
    return weights


def decode_records(ds, config: JobConfig, config_hash: str, reports=None):
    """Preprocessing (CPU tasks) and speculative decoding (the decode actor pool) of a Dataset of records
    (stages.RECORD_SCHEMA rows) -> decoded rows (stages.DECODED_SCHEMA). reports: an OperatingPoints actor that
    collects the decode actors' operating points, or None."""
    import ray

    c = config.compute
    # batch_size=None: one block at a time, as the stage before made it. A row count here would become the
    # bundle size of the task Ray Data fuses with the reader, and that task would read that many shards in a
    # row (all of a small job's) on one node, instead of one shard per task across the cluster.
    ds = ds.map_batches(preprocess, fn_kwargs={"config": config}, batch_format="pyarrow", batch_size=None)
    # An async actor with several batches in flight: the engine decodes rows of many batches together.
    return ds.map_batches(
        DecodeActor,
        fn_constructor_kwargs={"config": config, "config_hash": config_hash, "reports": reports},
        batch_format="pyarrow",
        batch_size=DECODE_BATCH_ROWS,
        compute=ray.data.ActorPoolStrategy(
            size=c.actors,
            max_concurrent_calls_per_actor=DECODE_TASKS_PER_ACTOR,
            max_tasks_in_flight_per_actor=2 * DECODE_TASKS_PER_ACTOR,
        ),
        num_gpus=_gpus_per_actor(config),
        num_cpus=c.cpus_per_actor,
    )


def _gpus_per_actor(config: JobConfig) -> float:
    import ray

    if config.compute.num_gpus != "auto":
        return float(config.compute.num_gpus)
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def dataset_records(batch: pa.Table, image_column: str, storage_options: dict) -> pa.Table:
    """map_batches: a user's rows -> records, the shape shard readers give (one bad row, one error record)."""
    return pa.Table.from_pylist(
        [_record(row, image_column, storage_options) for row in batch.to_pylist()], schema=RECORD_SCHEMA
    )


def _record(row: dict, image_column: str, storage_options: dict) -> dict:
    text = {name: row.get(name) for name in TEXT_FIELDS}
    extra = {k: v for k, v in row.items() if k not in (image_column, *TEXT_FIELDS, *IDENTITY_FIELDS)}
    record = {
        "image": None,
        "caption": _text(text["caption"]),
        "question": _text(text["question"]),
        "choices": None if text["choices"] is None else [str(c) for c in text["choices"]],
        "answer": _text(text["answer"]),
        # Extra columns travel as the record's metadata, where `fields` finds renamed task fields.
        "meta": json.dumps(extra, ensure_ascii=False, default=str) if extra else None,
        "error": None,
        "row_index": 0,
        "is_end": False,
    }
    value = row.get(image_column)
    try:
        record["image"], source = _image_bytes(value, storage_options)
    except Exception as exc:  # a bad row becomes an error row, never a failed batch
        record["error"] = f"cannot read the image in column {image_column!r} ({type(exc).__name__}: {exc})"
        source = value if isinstance(value, str) else ""
    # Without a key column, a row is named by its content: the same row always gets the same key (and so the
    # same sampling seed), however the Dataset is split, ordered or rerun.
    digest = hashlib.sha256(record["image"] or b"")
    digest.update(json.dumps(text, sort_keys=True, default=str).encode())
    record["key"] = str(row["key"]) if row.get("key") is not None else digest.hexdigest()[:16]
    record["shard_id"] = str(row.get("shard_id") or "")
    record["source"] = str(row.get("source") or source)
    return record


def _text(value) -> str | None:
    return None if value is None else str(value)


def _image_bytes(value, storage_options: dict) -> tuple[bytes, str]:
    """(encoded image bytes, its path or URI if it came from one). Decoding and validation happen later, in
    preprocessing, the same way for every source."""
    if isinstance(value, dict):  # Hugging Face datasets' Image feature
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), ""
    if isinstance(value, str):
        import fsspec

        def read() -> bytes:
            with fsspec.open(value, "rb", **storage_options) as f:
                return f.read()

        return with_retries(read), value
    if isinstance(value, np.ndarray):
        value = Image.fromarray(value)
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")  # lossless: the pixels reach the model unchanged
        return buffer.getvalue(), ""
    raise TypeError(f"expected bytes, a path or URI, a PIL image or a numpy array, got {type(value).__name__}")
