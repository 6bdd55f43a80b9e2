"""Tables as input: Parquet files (format parquet) and the Arrow or Parquet files of a Hugging Face `datasets`
dataset (format hf), one record per row.

The images are in `input.image_column` (default `image`); a file without that column may declare its image
column in the Hugging Face features it stores. A value is encoded bytes, a Hugging Face Image
(`{"bytes", "path"}`: the bytes when present), or a path: a URI, or relative to the image root (a Parquet file's
own folder; for a Hugging Face dataset `input.images`, by default the dataset's folder). A row's key is its `key`
column, else its `id` column (as Hugging Face datasets name it), else its row number. The task's fields come from
the columns of their names (`caption`, `question`, `choices`, `answer`, `references`; a list caption or answer is
several references), the other columns go to the record's metadata.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from specvlm.data.error_kinds import tagged
from specvlm.data.records import Record, Shard, SourceError, fetch_image, fields_record, task_fields
from specvlm.data.retry import filesystem

_BATCH_ROWS = 64  # rows of image bytes held at once; Parquet row groups are read one at a time


def read_table(
    shard: Shard, fs: AbstractFileSystem, path: str, image_column: str, storage_options: dict
) -> Iterator[Record]:
    with fs.open(path, "rb") as f:
        schema, batches = _open(f, path)
        column = find_image_column(shard, schema, image_column)
        root = shard.images or posixpath.dirname(shard.uri)
        advice = "check input.images" if shard.format == "hf" else f"check the paths in column {column!r}"
        row = 0
        for batch in batches:
            for values in batch.to_pylist():
                image = values.pop(column)
                if isinstance(image, dict):  # the Image feature: the bytes win over the path, as in datasets
                    image = image.get("bytes") if image.get("bytes") is not None else image.get("path")
                key = values.pop("key") if "key" in values else values.pop("id", None)
                sample = task_fields(values)
                if isinstance(image, str):
                    image = fetch_image(image, root, storage_options, advice)
                elif image is None and shard.format == "parquet":
                    # A benchmark's row may have no image (a text-only question); a Parquet shard's row needs one.
                    sample["error"] = tagged("image_missing", f"row {row} has no image in column {column!r}")
                yield fields_record(shard, f"{row:08d}" if key is None else str(key), sample, image)
                row += 1


def check_image_column(shard: Shard, storage_options: dict, image_column: str) -> None:
    """Raise SourceError, saying which columns the file has, when its image column is not there (reads the file's
    schema alone: what a job checks before it starts)."""
    fs, path = filesystem(shard.uri, storage_options)
    with fs.open(path, "rb") as f:
        find_image_column(shard, _open(f, path)[0], image_column)


def find_image_column(shard: Shard, schema: pa.Schema, image_column: str) -> str:
    """The column holding the images: `image_column` when the file has it, else the one its Hugging Face features
    declare an Image."""
    column = image_column if image_column in schema.names else _declared_image_column(schema)
    if column is None:
        raise SourceError(
            f"{shard.uri} has no image column {image_column!r}; its columns are {', '.join(schema.names)}. Set "
            "input.image_column to the one holding the images (encoded bytes, a Hugging Face Image, or paths)"
        )
    kind = schema.field(column).type
    if not (_is_text_or_bytes(kind) or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)):
        raise SourceError(
            f"column {column!r} of {shard.uri} holds {kind}, not images (encoded bytes, a Hugging Face Image, or "
            f"paths); its columns are {', '.join(schema.names)}: set input.image_column to the one holding them"
        )
    return column


def _declared_image_column(schema: pa.Schema) -> str | None:
    stored = json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))
    features = stored.get("info", {}).get("features", {})
    declared = [n for n, feature in features.items() if isinstance(feature, dict) and feature.get("_type") == "Image"]
    return next((name for name in declared if name in schema.names), None)


def _is_text_or_bytes(kind: pa.DataType) -> bool:
    types = pa.types
    return types.is_binary(kind) or types.is_large_binary(kind) or types.is_string(kind) or types.is_large_string(kind)


def _open(f, path: str) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """A Parquet file, or the Arrow stream files `datasets.save_to_disk` writes: its schema and its row batches."""
    if path.endswith(".arrow"):
        stream = pa.ipc.open_stream(f)
        return stream.schema, iter(stream)
    parquet = pq.ParquetFile(f)
    return parquet.schema_arrow, parquet.iter_batches(batch_size=_BATCH_ROWS)
