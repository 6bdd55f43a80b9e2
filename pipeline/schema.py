"""The tables that flow through the pipeline, and the codec between a prepared row and an engine request.

OUTPUT_SCHEMA is the output table, one row per input sample; docs/output.md documents every column and a test
checks both agree. PREPARED_SCHEMA is what the read tasks hand the decode actors, DECODED_SCHEMA what the actors
hand the driver; both carry each row's place in its shard (ROW_FIELDS).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # the sample's key within its shard
        pa.field("shard_id", pa.string(), nullable=False),  # input shard id; also names the output file
        pa.field("source", pa.string(), nullable=False),  # input shard URI
        pa.field("task", pa.string(), nullable=False),  # caption | vqa | mc
        pa.field("prompt", pa.string()),  # the full prompt text given to the target (chat format applied)
        pa.field("text", pa.string()),  # generated text, special tokens removed; null on error
        pa.field("output_ids", pa.list_(pa.int32())),  # generated token ids (EOS included when hit)
        pa.field("answer", pa.string()),  # mc: the extracted choice letter
        pa.field("reference", pa.string()),  # ground truth from the record (caption, or answer), if any
        pa.field("references", pa.list_(pa.string())),  # every reference, when the record has several
        pa.field("meta", pa.string()),  # the record's other fields as JSON (evaluation slices by them)
        pa.field("new_tokens", pa.int32()),
        pa.field("target_calls", pa.int32()),
        pa.field("draft_calls", pa.int32()),
        pa.field("proposed_tokens", pa.int32()),
        pa.field("accepted_tokens", pa.int32()),
        pa.field("accepted_per_step", pa.list_(pa.int32())),
        pa.field("nodes_per_step", pa.list_(pa.int32())),
        pa.field("block_efficiency", pa.float64()),
        pa.field("acceptance_rate", pa.float64()),
        pa.field("mbsu", pa.float64()),
        pa.field("latency_s", pa.float64()),
        pa.field("tokens_per_s", pa.float64()),
        pa.field("stop_reason", pa.string(), nullable=False),  # eos | max_tokens | error
        pa.field("model", pa.string(), nullable=False),  # target location
        pa.field("draft", pa.string(), nullable=False),  # draft kind and location, or "none"
        pa.field("config_hash", pa.string(), nullable=False),  # hash of the settings that shape the output
        pa.field("error", pa.string()),  # null, or what went wrong with this sample
    ]
)

# A row's place in its shard. `is_end`: an end marker, not a sample (only a shard without rows needs one). On the
# row that closes its shard (its last, or its marker): `shard_rows`, the shard's row count, and `shard_error`, why
# the shard could not be read to its end (None when it was).
ROW_FIELDS = [
    pa.field("row_index", pa.int64(), nullable=False),
    pa.field("is_end", pa.bool_(), nullable=False),
    pa.field("shard_rows", pa.int64()),
    pa.field("shard_error", pa.string()),
]
ROW_FIELD_NAMES = tuple(f.name for f in ROW_FIELDS)

PREPARED_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("shard_id", pa.string()),
        pa.field("source", pa.string()),
        pa.field("task", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("reference", pa.string()),
        pa.field("references", pa.list_(pa.string())),
        pa.field("meta", pa.string()),
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("pixel_values", pa.binary()),
        pa.field("pixel_shape", pa.list_(pa.int32())),
        pa.field("image_sizes", pa.list_(pa.int32())),
        pa.field("image_key", pa.string()),  # the image's content hash: rows with equal keys share its prefill
        pa.field("seed", pa.int64()),
        pa.field("error", pa.string()),
        *ROW_FIELDS,
    ]
)
DECODED_SCHEMA = pa.schema([*OUTPUT_SCHEMA, *ROW_FIELDS])
# Prepared-row columns the decode actor copies into its output row as they are.
PASSED_THROUGH = ("key", "shard_id", "source", "task", "prompt", "reference", "references", "meta", "error")


def encode_inputs(encoded) -> dict:
    """A processor's output (numpy) -> the prepared row's model-input columns: token ids, and the pixels as
    float32 bytes with their shape (Arrow has no tensor type every reader takes)."""
    row = {"input_ids": encoded["input_ids"][0].tolist()}
    if "pixel_values" in encoded:
        pixels = np.ascontiguousarray(encoded["pixel_values"], dtype=np.float32)
        row.update(pixel_values=pixels.tobytes(), pixel_shape=list(pixels.shape))
    if "image_sizes" in encoded:
        row["image_sizes"] = [int(v) for v in np.asarray(encoded["image_sizes"]).reshape(-1)]
    return row


def row_to_request(row: dict):
    """A prepared row as an engine request (the pixel bytes and their shape back into a tensor)."""
    import torch

    from specvlm.specdec.requests import Request

    pixels = None  # a text-only prompt
    if row["pixel_values"] is not None:
        array = np.frombuffer(row["pixel_values"], dtype=np.float32).reshape(row["pixel_shape"])
        pixels = torch.from_numpy(array.copy())
    sizes = None if row["image_sizes"] is None else torch.tensor(row["image_sizes"]).reshape(-1, 2)
    return Request(row["input_ids"], pixels, image_sizes=sizes, seed=row["seed"], image_key=row.get("image_key"))
