"""Writing results: one Parquet file per input shard, complete or absent, plus a run manifest.

The driver collects decoded rows per shard and writes a shard's file once the shard's end marker and all of its
rows have arrived. The file is written under a temporary name and moved into place, so a reader (or a rerun)
never sees a partial file: on a local disk the move is an atomic rename, on object stores the object appears
in one piece. The file name is the input shard's id, so a rerun finds finished shards by name and skips them,
which is what makes a crashed job resumable with every row written exactly once.
"""

from __future__ import annotations

import json
import posixpath
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.faults import inject_fault
from pipeline.schema import OUTPUT_SCHEMA
from specvlm.data.retry import with_retries

HASH_METADATA_KEY = b"specvlm.config_hash"
MANIFEST = "_manifest.json"


class ResumeConflict(RuntimeError):
    pass


class OutputDir:
    def __init__(self, uri: str, storage_options: dict):
        self.uri = uri.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **storage_options)

    def shard_path(self, shard_id: str) -> str:
        return posixpath.join(self.root, f"{shard_id}.parquet")

    def finished(self, config_hash: str) -> set[str]:
        """Shard ids already written. Refuses to resume over output made with different settings."""
        return with_retries(lambda: self._finished(config_hash))

    def _finished(self, config_hash: str) -> set[str]:
        self.fs.invalidate_cache()
        if not self.fs.exists(self.root):
            return set()
        done = set()
        for path in self.fs.glob(posixpath.join(self.root, "*.parquet")):
            with self.fs.open(path, "rb") as f:
                written = (pq.read_schema(f).metadata or {}).get(HASH_METADATA_KEY, b"").decode()
            if written != config_hash:
                raise ResumeConflict(
                    f"{self.uri} already holds {posixpath.basename(path)} written with other settings (config hash "
                    f"{written or 'unknown'}, this job {config_hash}); write to a new output URI, or delete the "
                    "old output to redo it"
                )
            done.add(posixpath.basename(path)[: -len(".parquet")])
        return done

    def check_writable(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        probe = posixpath.join(self.root, f"_write_probe-{uuid.uuid4().hex}")
        with self.fs.open(probe, "wb") as f:
            f.write(b"ok")
        self.fs.rm(probe)

    def write_atomic(self, path: str, write) -> None:
        """write(file_object) into a temporary object, then move it to `path`; retried as a whole."""
        with_retries(lambda: self._write_atomic(path, write))

    def _write_atomic(self, path: str, write) -> None:
        staging = posixpath.join(self.root, "_staging", f"{uuid.uuid4().hex}-{posixpath.basename(path)}")
        self.fs.makedirs(posixpath.dirname(staging), exist_ok=True)
        with self.fs.open(staging, "wb") as f:
            write(f)
        self.fs.mv(staging, path)

    def clean_staging(self) -> None:
        """Drop temporaries; any left there belong to a run that died between writing and moving a file."""
        staging = posixpath.join(self.root, "_staging")
        if self.fs.exists(staging):
            self.fs.rm(staging, recursive=True)

    def write_shard(self, shard_id: str, table: pa.Table, config_hash: str) -> None:
        # The hash also goes where pandas keeps DataFrame.attrs, so pd.read_parquet shows it (df.attrs).
        pandas_attrs = json.dumps({HASH_METADATA_KEY.decode(): config_hash}).encode()
        metadata = {HASH_METADATA_KEY: config_hash.encode(), b"PANDAS_ATTRS": pandas_attrs}
        table = table.replace_schema_metadata(metadata)
        self.write_atomic(self.shard_path(shard_id), lambda f: pq.write_table(table, f))

    def read_all(self, columns: list[str]) -> pa.Table:
        self.fs.invalidate_cache()
        parts = []
        for path in sorted(self.fs.glob(posixpath.join(self.root, "*.parquet"))):
            with self.fs.open(path, "rb") as f:
                parts.append(pq.read_table(f, columns=columns))
        return pa.concat_tables(parts) if parts else OUTPUT_SCHEMA.empty_table().select(columns)

    def write_manifest(self, manifest: dict) -> None:
        payload = json.dumps(manifest, indent=2, sort_keys=True).encode()
        self.write_atomic(posixpath.join(self.root, MANIFEST), lambda f: f.write(payload))


class ShardCollector:
    """Gathers rows per shard as they stream in (in any order) and writes each shard when it is complete."""

    def __init__(self, output: OutputDir, config_hash: str):
        self.output = output
        self.config_hash = config_hash
        self.rows: dict[str, list[dict]] = {}
        self.expected: dict[str, int] = {}
        self.written: dict[str, int] = {}  # shard id -> rows
        self.tokens = 0  # generated tokens in the shards written

    def add(self, batch: pa.Table) -> None:
        for row in batch.to_pylist():
            shard = row["shard_id"]
            if row["is_end"]:
                self.expected[shard] = row["row_index"]
            else:
                self.rows.setdefault(shard, []).append(row)
            if shard in self.expected and len(self.rows.get(shard, ())) == self.expected[shard]:
                self._write(shard)

    def _write(self, shard: str) -> None:
        rows = sorted(self.rows.pop(shard, []), key=lambda r: r["row_index"])
        del self.expected[shard]
        table = pa.Table.from_pylist(rows, schema=pa.schema([*OUTPUT_SCHEMA, pa.field("row_index", pa.int64())]))
        self.output.write_shard(shard, table.select(OUTPUT_SCHEMA.names), self.config_hash)
        self.written[shard] = len(rows)
        self.tokens += sum(r["new_tokens"] or 0 for r in rows)
        inject_fault("shard_written")

    @property
    def incomplete(self) -> list[str]:
        return sorted(set(self.rows) | set(self.expected))
