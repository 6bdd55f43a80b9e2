"""The output table: one row per input sample. The README documents every column; a test checks both agree."""

from __future__ import annotations

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
