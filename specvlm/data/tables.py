"""Parquet files as input: one record per row, the image in one column."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from specvlm.data.error_kinds import tagged
from specvlm.data.records import Record, Shard, SourceError, record

_PARQUET_BATCH_ROWS = 64  # rows of image bytes held at once; row groups are read one at a time


def read_parquet(shard: Shard, fs: AbstractFileSystem, path: str, image_column: str) -> Iterator[Record]:
    text_fields = ("caption", "question", "choices", "answer")
    known = {image_column, "key", *text_fields}
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        if image_column not in parquet.schema_arrow.names:
            raise SourceError(f"no column {image_column!r} (columns: {parquet.schema_arrow.names}); set image_column")
        row = 0
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            for values in batch.to_pylist():
                image = values[image_column]
                if isinstance(image, dict):  # Hugging Face datasets' Image feature: {"bytes", "path"}
                    image = image.get("bytes")
                image = image if isinstance(image, bytes) else None  # e.g. a column of paths, not bytes
                key = str(values["key"]) if values.get("key") is not None else f"{row:08d}"
                missing = f"row {row} has no image bytes"
                extra = {name: value for name, value in values.items() if name not in known}
                yield record(
                    shard,
                    key,
                    image=image,
                    meta=json.dumps(extra, ensure_ascii=False, default=str) if extra else None,
                    error=None if image else tagged("image_missing", f"{missing} in column {image_column!r}"),
                    **{name: values.get(name) for name in text_fields},
                )
                row += 1
