"""The pipeline's stages, each a plain function or a callable class that Ray Data maps over rows or batches.

    read_shards    (map_batches, CPU task)  one shard -> its records, numbered, streamed in blocks, then an end marker
    preprocess     (map_batches, CPU task)  decode + validate the image, build the prompt, run the processor
    DecodeActor        (map_batches, actor)     target + draft loaded once; batched speculative decoding

Every row carries `row_index` (its position in the shard) and `is_end`: the reader appends one end-marker row
per shard whose row_index is the shard's row count. Rows may reach the writer in any order; a shard is
complete when its marker and that many rows have arrived. Stages never raise for bad data: a row that cannot
be processed gets `error` set and flows on, so one bad image never fails its batch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import JobConfig
from pipeline.faults import inject_fault
from pipeline.schema import OUTPUT_SCHEMA
from specvlm.data.images import ImageError, decode_image
from specvlm.data.prompts import LETTERS, PromptError, extract_choice, instruction, render
from specvlm.data.retry import backoff, is_transient
from specvlm.data.sources import Shard, read_shard

ROW_FIELDS = [pa.field("row_index", pa.int64(), nullable=False), pa.field("is_end", pa.bool_(), nullable=False)]

RECORD_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("shard_id", pa.string()),
        pa.field("source", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("caption", pa.string()),
        pa.field("question", pa.string()),
        pa.field("choices", pa.list_(pa.string())),
        pa.field("answer", pa.string()),
        pa.field("meta", pa.string()),
        pa.field("error", pa.string()),
        *ROW_FIELDS,
    ]
)

PREPARED_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("shard_id", pa.string()),
        pa.field("source", pa.string()),
        pa.field("task", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("reference", pa.string()),
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("pixel_values", pa.binary()),
        pa.field("pixel_shape", pa.list_(pa.int32())),
        pa.field("image_sizes", pa.list_(pa.int32())),
        pa.field("seed", pa.int64()),
        pa.field("error", pa.string()),
        *ROW_FIELDS,
    ]
)
DECODED_SCHEMA = pa.schema([*OUTPUT_SCHEMA, *ROW_FIELDS])


READ_BATCH_ROWS = 32  # records per block out of the reader: a shard is streamed, never held whole


def read_shards(items: pa.Table, storage_options: dict, attempts: int = 5) -> Iterator[pa.Table]:
    """map_batches (one shard per call): the shard's records, numbered, in blocks, then its end marker.

    A shard whose stream breaks for a moment (a dropped connection, throttling) is reopened and resumed
    after the records already sent, with backoff; only a lasting failure becomes an error row.
    """
    for item in items.to_pylist():
        shard = Shard(**{**item, "files": tuple(item["files"])})
        sent, block = 0, []
        for attempt in range(attempts):
            try:
                last_try = attempt == attempts - 1
                for record in read_shard(
                    shard, storage_options=storage_options, skip=sent, raise_transient=not last_try
                ):
                    block.append({**record, "row_index": sent, "is_end": False})
                    sent += 1
                    if len(block) == READ_BATCH_ROWS:
                        yield pa.Table.from_pylist(block, schema=RECORD_SCHEMA)
                        block = []
                break
            except Exception as exc:  # only transient errors reach here (see raise_transient)
                if not is_transient(exc):
                    raise
                time.sleep(backoff(attempt))
        block.append(_end_marker(shard, sent))
        yield pa.Table.from_pylist(block, schema=RECORD_SCHEMA)


def _end_marker(shard: Shard, rows: int) -> dict:
    return {
        "key": "",
        "shard_id": shard.shard_id,
        "source": shard.uri,
        "image": None,
        "caption": None,
        "question": None,
        "choices": None,
        "answer": None,
        "meta": None,
        "error": None,
        "row_index": rows,
        "is_end": True,
    }


def sample_seed(seed: int, shard_id: str, key: str) -> int:
    """A per-sample sampling seed that does not depend on batching, ordering or reruns."""
    digest = hashlib.sha256(f"{seed}:{shard_id}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@functools.lru_cache(maxsize=2)
def _load_processor(target: str, trust_remote_code: bool, storage_options_json: str):
    from transformers import AutoProcessor

    from specvlm.models.checkpoints import resolve_model_dir

    # Preprocessing needs the processor's files, not the weights: a CPU node never downloads the checkpoint.
    path = resolve_model_dir(target, storage_options=json.loads(storage_options_json), weights=False)
    return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)


def preprocess(batch: pa.Table, config: JobConfig) -> pa.Table:
    """map_batches (CPU tasks, fused with the read): prepared rows for the decode actors."""
    m = config.model
    processor = _load_processor(m.target, m.trust_remote_code, json.dumps(m.storage_options, sort_keys=True))
    prepare = Preparer(config, processor)
    return pa.Table.from_pylist([prepare(row) for row in batch.to_pylist()], schema=PREPARED_SCHEMA)


class Preparer:
    def __init__(self, config: JobConfig, processor):
        self.config = config
        self.processor = processor

    def __call__(self, record: dict) -> dict:
        task = self.config.task
        fields = _mapped_fields(record, self.config.input.fields)
        row = {
            "key": record["key"],
            "shard_id": record["shard_id"],
            "source": record["source"],
            "task": task.kind,
            "prompt": None,
            "reference": _reference(task.kind, fields),
            "input_ids": None,
            "pixel_values": None,
            "pixel_shape": None,
            "image_sizes": None,
            "error": record["error"],
            "seed": sample_seed(self.config.decode.seed, record["shard_id"], record["key"]),
            "row_index": record["row_index"],
            "is_end": record["is_end"],
        }
        if record["is_end"] or row["error"]:
            return row
        try:
            image = decode_image(record["image"], max_pixels=self.config.compute.max_pixels)
            text = instruction(
                task.kind, fields, caption_instruction=task.caption_instruction, mc_suffix=task.mc_suffix
            )
            row["prompt"] = render(text, self.processor, task.template)
            encoded = self.processor(images=image, text=row["prompt"], return_tensors="np")
        except (ImageError, PromptError) as exc:
            row["error"] = str(exc)
            return row
        except Exception as exc:
            row["error"] = f"preprocessing failed: {type(exc).__name__}: {exc}"
            return row
        pixels = np.ascontiguousarray(encoded["pixel_values"], dtype=np.float32)
        row.update(
            input_ids=encoded["input_ids"][0].tolist(), pixel_values=pixels.tobytes(), pixel_shape=list(pixels.shape)
        )
        if "image_sizes" in encoded:
            row["image_sizes"] = [int(v) for v in np.asarray(encoded["image_sizes"]).reshape(-1)]
        return row


def _mapped_fields(record: dict, mapping: dict[str, str]) -> dict:
    """The record's task fields, with `input.fields` renaming them from its metadata (e.g. question: mc_question)."""
    fields = dict(record)
    if mapping and record.get("meta"):
        try:
            meta = json.loads(record["meta"])
        except ValueError:
            meta = {}
        for name, source in mapping.items():
            if source in meta:
                fields[name] = meta[source]
    return fields


def _reference(task: str, fields: dict) -> str | None:
    if task == "caption":
        return fields.get("caption")
    answer = fields.get("answer")
    if task == "mc" and isinstance(answer, int):
        return LETTERS[answer]
    return None if answer is None else str(answer)


class DecodeActor:
    """A decode actor: loads the target and the draft once, then maps batches of prepared rows to output rows."""

    def __init__(self, config: JobConfig, config_hash: str):
        from transformers.utils import logging as hf_logging

        from specvlm.models.loading import load_draft, load_target
        from specvlm.specdec.decode import DecodeConfig, SpeculativeDecoder
        from specvlm.specdec.sampling import SamplingParams
        from specvlm.specdec.tree import TreeSettings

        hf_logging.disable_progress_bar()  # one bar per weight file per actor only clutters the job's log

        m, d, s = config.model, config.draft, config.decode
        self.config = config
        if config.compute.torch_threads:
            torch.set_num_threads(config.compute.torch_threads)
        self.target = load_target(
            m.target,
            device=m.device,
            dtype=m.dtype,
            trust_remote_code=m.trust_remote_code,
            storage_options=m.storage_options,
        )
        tree = TreeSettings(**d.tree.model_dump()) if d.mode == "tree" else None
        draft = load_draft(
            d.kind,
            self.target,
            d.path,
            trust_remote_code=m.trust_remote_code,
            storage_options=m.storage_options,
            max_ngram=d.max_ngram,
            min_ngram=d.min_ngram,
            tree=tree,
            min_confidence=d.min_confidence,
        )
        eos = self.target.model.generation_config.eos_token_id
        decode_config = DecodeConfig(
            max_new_tokens=s.max_new_tokens,
            gamma=d.gamma,
            sampling=SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,) if eos is not None else (),
        )
        self.decoder = SpeculativeDecoder(self.target.model, draft, decode_config)
        self.window = self.decoder.max_nodes + 1
        self.identity = {"model": m.target, "draft": config.draft_name(), "config_hash": config_hash}

    def __call__(self, batch: pa.Table) -> pa.Table:
        inject_fault("decode")
        rows = batch.to_pylist()
        todo = [i for i, r in enumerate(rows) if not r["is_end"] and not r["error"]]
        by_row = {}
        for group in self._token_budget_groups([rows[i] for i in todo], [i for i in todo]):
            by_row.update(zip(group, self._generate([self._request(rows[i]) for i in group])))
        return pa.Table.from_pylist([self._output(r, by_row.get(i)) for i, r in enumerate(rows)], schema=DECODED_SCHEMA)

    def _token_budget_groups(self, rows: list[dict], ids: list[int]) -> list[list[int]]:
        """Split a batch so each engine call holds at most compute.max_batch_tokens cache slots (prompt plus
        generated tokens plus one draft window per row): memory stays bounded whatever the prompt lengths."""
        budget, per_row = self.config.compute.max_batch_tokens, self.config.decode.max_new_tokens + self.window
        groups, current, used = [], [], 0
        for row, i in zip(rows, ids):
            cost = len(row["input_ids"]) + per_row
            if current and used + cost > budget:
                groups.append(current)
                current, used = [], 0
            current.append(i)
            used += cost
        return groups + [current] if current else groups

    def _generate(self, requests):
        try:
            return self.decoder.generate(requests)
        except Exception:
            if len(requests) == 1:
                from specvlm.specdec.requests import Result

                return [Result.failed(f"decoding failed: {traceback.format_exc(limit=1).strip()}")]
            # One request may break the whole batch (say an input the model cannot handle): isolate it by
            # decoding the rest in halves, so every other row still gets its text.
            half = len(requests) // 2
            return self._generate(requests[:half]) + self._generate(requests[half:])

    def _request(self, row: dict):
        from specvlm.specdec.requests import Request

        pixels = np.frombuffer(row["pixel_values"], dtype=np.float32).reshape(row["pixel_shape"])
        sizes = None if row["image_sizes"] is None else torch.tensor(row["image_sizes"]).reshape(-1, 2)
        return Request(row["input_ids"], torch.from_numpy(pixels.copy()), image_sizes=sizes, seed=row["seed"])

    def _output(self, row: dict, result) -> dict:
        out = {
            name: row.get(name)
            for name in ("key", "shard_id", "source", "task", "prompt", "reference", "error", "row_index", "is_end")
        }
        out.update(self.identity, stop_reason="error")
        if result is None:
            return out
        out.update(stop_reason=result.stop_reason, error=result.error)
        if result.error is None:
            out["output_ids"] = result.tokens
            out["text"] = self.target.tokenizer.decode(result.tokens, skip_special_tokens=True).strip()
            if row["task"] == "mc":
                out["answer"] = extract_choice(out["text"])
            metrics = result.metrics.as_row()
            out.update({k: v for k, v in metrics.items() if k in DECODED_SCHEMA.names})
        return out


def shard_to_item(shard: Shard) -> dict:
    return {**asdict(shard), "files": list(shard.files)}
