"""The pipeline's stages, each a plain function or a callable class that Ray Data maps over rows or batches.

    read_and_prepare   (pipeline.reader, one read task per group of shards)  records -> prepared rows via
                       Preparer, numbered, streamed in blocks
    DecodeActor        (map_batches, actor)  target + draft loaded once; continuous batched speculative decoding

Every row carries `row_index` (its position in the shard); the row that closes a shard, its last (or an
end-marker row, `is_end`, for a shard without rows), carries the shard's row count and, if set, why the shard
could not be read to its end (schema.ROW_FIELDS). Rows may reach the writer in any order; a shard is complete
when its row count is known and that many rows have arrived. Stages never raise for bad data: a row that cannot
be processed gets `error` set and flows on, so one bad image never fails its batch.
"""

from __future__ import annotations

import functools
import hashlib
import json

import pyarrow as pa
import torch

from pipeline.config import JobConfig
from pipeline.faults import inject_fault
from pipeline.schema import DECODED_SCHEMA, PASSED_THROUGH, ROW_FIELD_NAMES, encode_inputs, row_to_request
from specvlm.data.error_kinds import tagged
from specvlm.data.images import ImageError, decode_image
from specvlm.data.prompts import (
    PromptError,
    choice_count,
    extract_choice,
    instruction,
    reference_strings,
    render,
    task_fields,
    task_reference,
)
from specvlm.engine import TargetSettings


def sample_seed(seed: int, shard_id: str, key: str) -> int:
    """A per-sample sampling seed that does not depend on batching, ordering or reruns."""
    digest = hashlib.sha256(f"{seed}:{shard_id}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def load_processor(model: TargetSettings):
    """The target's processor, loaded once per worker process (read tasks reuse their workers)."""
    return _load_processor(model.target, model.trust_remote_code, json.dumps(model.storage_options, sort_keys=True))


@functools.lru_cache(maxsize=2)
def _load_processor(target: str, trust_remote_code: bool, storage_options_json: str):
    from transformers import AutoProcessor

    from specvlm.models.checkpoints import resolve_model_dir

    # Preprocessing needs the processor's files, not the weights: a CPU node never downloads the checkpoint.
    path = resolve_model_dir(target, storage_options=json.loads(storage_options_json), weights=False)
    return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)


class Preparer:
    """A record (with its row_index and is_end) -> prepared rows for the decode actors, or error rows: one per
    prompt of task.prompts, else one."""

    def __init__(self, config: JobConfig, processor):
        self.config = config
        self.processor = processor

    def __call__(self, record: dict) -> dict:
        """The record's one prepared row (a job without task.prompts)."""
        (row,) = self.rows(record)
        return row

    def rows(self, record: dict) -> list[dict]:
        """The record's prepared rows, numbered from its row_index: one per prompt of task.prompts, keyed
        "<record key>#<prompt name>", else one keyed by the record's key. The image is decoded once for all of
        them, and they carry its content key, so the engine prefills it once (compute.share_image_prefill)."""
        task = self.config.task
        names = [None] if record["is_end"] or not task.prompts else list(task.prompts)
        fields = task_fields(record, self.config.input.fields)
        rows = [self._row(record, fields, index, name) for index, name in enumerate(names)]
        if record["is_end"] or record["error"]:
            return rows
        image, problem = None, None
        if record["image"] is not None:
            try:
                image = decode_image(record["image"], max_pixels=self.config.compute.max_pixels)
            except ImageError as exc:
                problem = tagged(exc.kind, str(exc))
            except Exception as exc:
                problem = tagged("preprocess_failed", f"{type(exc).__name__}: {exc}")
        content = None if record["image"] is None else "sha256:" + hashlib.sha256(record["image"]).hexdigest()
        for row, name in zip(rows, names):
            if problem:
                row["error"] = problem
            else:
                self._encode(row, fields, image, name)
                row["image_key"] = content
        return rows

    def _row(self, record: dict, fields: dict, index: int, prompt_name: str | None) -> dict:
        key = record["key"] if prompt_name is None else f"{record['key']}#{prompt_name}"
        return {
            "key": key,
            "shard_id": record["shard_id"],
            "source": record["source"],
            "task": self.config.task.kind,
            "prompt": None,
            "reference": task_reference(self.config.task.kind, fields),
            "references": reference_strings(fields.get("references")),
            "meta": record["meta"],
            "input_ids": None,
            "pixel_values": None,
            "pixel_shape": None,
            "image_sizes": None,
            "image_key": None,
            "error": record["error"],
            "seed": sample_seed(self.config.decode.seed, record["shard_id"], key),
            "row_index": record["row_index"] + index,
            "is_end": record["is_end"],
        }

    def _encode(self, row: dict, fields: dict, image, prompt_name: str | None) -> None:
        """The row's prompt and model inputs (image: the decoded image, None for a text-only record), or its error."""
        task = self.config.task
        try:
            text = instruction(
                task.kind,
                fields,
                caption_instruction=task.caption_instruction,
                mc_suffix=task.mc_suffix,
                mc_protocol=task.mc_protocol,
            )
            if prompt_name is not None:
                text = task.prompts[prompt_name].replace("{question}", text)
            if image is None:  # only benchmark layouts give such records (a ScienceQA text question)
                if task.kind == "caption":
                    problem = f"record {row['key']!r} has no image, and a caption needs one"
                    row["error"] = tagged("image_missing", problem)
                    return
                # A text-only prompt, as LLaVA targets take them; a target that cannot fails here, on this row.
                row["prompt"] = render(text, self.processor, task.template, image=False)
                encoded = self.processor(text=row["prompt"], return_tensors="np")
            else:
                row["prompt"] = render(text, self.processor, task.template)
                encoded = self.processor(images=image, text=row["prompt"], return_tensors="np")
        except PromptError as exc:
            row["error"] = tagged("missing_field", str(exc))
            return
        except Exception as exc:
            row["error"] = tagged("preprocess_failed", f"{type(exc).__name__}: {exc}")
            return
        row.update(encode_inputs(encoded))


# Rows per Ray Data batch into a decode actor: small, so that a shard's rows flow on as soon as they are decoded.
DECODE_BATCH_ROWS = 16
# Batches each decode actor holds at once: Ray tasks in the actor (Ray Core max_concurrency), each with up to
# Ray Data's default of 4 async batches. 8 x 4 x 16 = 512 rows in flight: enough to keep the engine's running
# batch full while rows finish and new ones join.
DECODE_TASKS_PER_ACTOR = 8


def decode_config(config: JobConfig):
    """The engine's settings for a job's decode actors."""
    from specvlm.specdec.decode import DecodeConfig

    c = config.compute
    return DecodeConfig(
        max_new_tokens=config.decode.max_new_tokens,
        sampling=config.decode,
        max_rows=None if c.batch_size == "auto" else c.batch_size,
        max_batch_tokens=c.max_batch_tokens,
        adaptive=config.draft.adaptive,
        float32_head=config.decode.float32_head,
        # The driver settles auto for a job (pipeline/compiling.py); a stage built otherwise compiles on GPUs only.
        compile=c.compile == "on" or (c.compile == "auto" and torch.cuda.is_available()),
        share_prefill=c.share_image_prefill,
    )


class DecodeActor:
    """A decode actor: loads target and draft once; every call hands its batch's rows to the engine's running
    batch and yields their output rows once all are decoded. Calls are async and many are in flight at once, so
    rows of many Ray Data batches decode together and a finished row is replaced at once (continuous batching)."""

    def __init__(self, config: JobConfig, config_hash: str, reports=None):
        from transformers.utils import logging as hf_logging

        from specvlm.engine import build_engine
        from specvlm.specdec.decode import SpeculativeDecoder
        from specvlm.specdec.service import EngineService

        hf_logging.disable_progress_bar()  # one bar per weight file per actor only clutters the job's log
        if config.compute.torch_threads:
            torch.set_num_threads(config.compute.torch_threads)
        decode = decode_config(config)
        engine = build_engine(config.model, config.draft, decode)
        self.tokenizer = engine.target.tokenizer
        self.service = EngineService(lambda: SpeculativeDecoder(engine.target.model, engine.draft, decode))
        self.identity = {"model": config.model.target, "draft": config.draft.label, "config_hash": config_hash}
        self.reports = reports  # where the actor's operating point goes, for the job's manifest

    async def __call__(self, batch: pa.Table):
        import asyncio

        inject_fault("decode")
        rows = batch.to_pylist()
        pending = {
            i: asyncio.wrap_future(self.service.submit(row_to_request(row)))
            for i, row in enumerate(rows)
            if not row["is_end"] and not row["error"]
        }
        results = dict(zip(pending, await asyncio.gather(*pending.values())))
        yield pa.Table.from_pylist([self._output(r, results.get(i)) for i, r in enumerate(rows)], schema=DECODED_SCHEMA)
        # After every batch: an actor does not know which batch is its last, and the manifest should hold the
        # operating point as of the end of the run (one small message per batch of rows).
        if self.reports is not None:
            self.reports.record.remote(self.service.describe())

    def _output(self, row: dict, result) -> dict:
        out = {name: row.get(name) for name in (*PASSED_THROUGH, *ROW_FIELD_NAMES)}
        out.update(self.identity, stop_reason="error")
        if result is None:
            return out
        out.update(stop_reason=result.stop_reason, error=result.error)
        if result.error is None:
            out["output_ids"] = result.tokens
            out["text"] = self.tokenizer.decode(result.tokens, skip_special_tokens=True).strip()
            if row["task"] == "mc":
                out["answer"] = extract_choice(out["text"], choice_count(row["prompt"]))
            metrics = result.metrics.as_row()
            out.update({k: v for k, v in metrics.items() if k in DECODED_SCHEMA.names})
        return out


def decode_stage(ds, config: JobConfig, config_hash: str, reports=None):
    """Prepared rows -> decoded rows, through the pool of decode actors. An async actor holds several batches at
    once: the engine decodes rows of many batches together. reports: an OperatingPoints actor, or None."""
    import ray

    c = config.compute
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
        num_gpus=gpus_per_actor(config),
        num_cpus=c.cpus_per_actor,
    )


def gpus_per_actor(config: JobConfig) -> float:
    import ray

    if config.compute.num_gpus != "auto":
        return float(config.compute.num_gpus)
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


class OperatingPoints:
    """A small Ray actor the decode actors report their operating point to (batch cap, draft depths, measured
    costs), so that the driver can put it in the job's manifest."""

    def __init__(self):
        self.points: dict[str, dict] = {}

    def record(self, point: dict) -> None:
        self.points[point["actor"]] = point

    def get(self) -> dict[str, dict]:
        return self.points
