"""Speculative decoding as a Ray Dataset transform, shaped like Ray Data LLM's `build_llm_processor`:

    processor = build_processor(ProcessorConfig(model=..., draft=...), preprocess=..., postprocess=...)
    ds = processor(ray.data.read_parquet(...))          # or from_huggingface, read_delta, your own datasource
    ds.write_parquet(...)                                # or anywhere Ray writes

Rows in: an image column (bytes, a path or URI, a PIL image, a numpy array, or a Hugging Face
{"bytes", "path"} image) plus prompt fields (question, choices, answer, caption; more by `fields`).
Rows out: the columns of the job's output schema (pipeline/schema.py). A bad row becomes a row with `error` set.

The rows are prepared the way a job's read tasks prepare a shard's records (stages.Preparer), then decoded by
the same decode actor pool (stages.decode_stage). The jobs feed that pool from shards instead, and keep their
resumable, one-file-per-shard output.
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

from pipeline.config import ComputeConfig, DecodeSettings, JobConfig, Section, TaskConfig, _no_secrets
from pipeline.job import check_models
from pipeline.schema import OUTPUT_SCHEMA, PREPARED_SCHEMA
from pipeline.sink import with_error_kinds
from pipeline.stages import Preparer, decode_stage, load_processor
from specvlm.data.error_kinds import tagged
from specvlm.data.retry import with_retries
from specvlm.engine import DraftSettings, TargetSettings

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
        ds = ds.map_batches(prepare_rows, fn_kwargs={"config": self.config}, batch_format="pyarrow", batch_size=16)
        ds = decode_stage(ds, self.config, self.config_hash).select_columns(OUTPUT_SCHEMA.names)
        ds = ds.map_batches(with_error_kinds, batch_format="pyarrow")  # the engine's errors get their kind, as a job's
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
    return Processor(job, job.output_hash(check_models(job)), preprocess, postprocess)


def prepare_rows(batch: pa.Table, config: JobConfig) -> pa.Table:
    """map_batches: a user's rows -> prepared rows for the decode actors (a bad row becomes an error row)."""
    i = config.input
    prepare = Preparer(config, load_processor(config.model))
    records = [row_record(row, i.image_column, i.storage_options) for row in batch.to_pylist()]
    rows = [prepared for record in records for prepared in prepare.rows(record)]  # one per prompt (task.prompts)
    return pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA)


def row_record(row: dict, image_column: str, storage_options: dict) -> dict:
    """A user's row -> a record, the shape shard readers give (an unreadable image: an error record)."""
    text = {name: row.get(name) for name in TEXT_FIELDS}
    extra = {k: v for k, v in row.items() if k not in (image_column, *TEXT_FIELDS, "references", *IDENTITY_FIELDS)}
    record = {
        "image": None,
        "caption": _text(text["caption"]),
        "question": _text(text["question"]),
        "choices": None if text["choices"] is None else [str(c) for c in text["choices"]],
        "answer": _text(text["answer"]),
        "references": None if row.get("references") is None else [str(r) for r in row["references"]],
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
        problem = f"cannot read the image in column {image_column!r} ({type(exc).__name__}: {exc})"
        record["error"] = tagged("read_failed", problem)
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
