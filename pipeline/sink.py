"""Writing results: one Parquet file per input shard, complete or absent, plus a run manifest.

The driver collects decoded rows per shard and writes a shard's file once the shard's end marker and all of its
rows have arrived, in whatever order they come. The file is written under a temporary name and moved into place,
so a reader (or a rerun) never sees a partial file: on a local disk the move is an atomic rename, on object
stores the object appears in one piece. The file name is the input shard's id, so a rerun finds finished shards
by name and skips them, which is what makes a crashed job resumable with every row written exactly once.

A shard that could not be read to its end gets no such file: the rows it did yield go to `_partial/<id>.parquet`,
which no rerun takes for done output and no reader of `<output>/*.parquet` (or of the folder as a Parquet data
set: pyarrow skips names starting with "_") picks up, and the manifest lists the shard with the reason.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.faults import inject_fault
from pipeline.schema import OUTPUT_SCHEMA
from specvlm.data.error_kinds import OTHER, kind_of, tagged
from specvlm.data.retry import DEFAULT_RETRY, RetryPolicy, describe, filesystem, with_retries

HASH_METADATA_KEY = b"specvlm.config_hash"
FAILURE_METADATA_KEY = b"specvlm.failure"
MANIFEST = "_manifest.json"
PARTIAL = "_partial"


class ResumeConflict(RuntimeError):
    pass


class OutputDir:
    def __init__(self, uri: str, storage_options: dict, retry: RetryPolicy = DEFAULT_RETRY):
        self.uri = uri.rstrip("/")
        self.storage_options = storage_options
        self.retry = retry
        self.fs, self.root = filesystem(self.uri, storage_options)

    def shard_path(self, shard_id: str) -> str:
        return posixpath.join(self.root, f"{shard_id}.parquet")

    def partial_path(self, shard_id: str) -> str:
        return posixpath.join(self.root, PARTIAL, f"{shard_id}.parquet")

    def finished(self, config_hash: str) -> set[str]:
        """Shard ids already written. Refuses to resume over output made with different settings."""
        return with_retries(lambda: self._finished(config_hash), self.retry)

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

    def check_writable(self, retry: RetryPolicy) -> None:
        """Write and remove a probe object, waiting for the store only seconds (preflight). Each request is retried
        on its own (`retry`, a short one): a dropped connection retried as a whole probe would leave a probe object
        behind for every retry after its write."""
        fs, root = filesystem(self.uri, self.storage_options, preflight=True)
        probe = posixpath.join(root, f"_write_probe-{uuid.uuid4().hex}")

        def ask_about_root():
            with contextlib.suppress(FileNotFoundError):
                fs.info(root)

        # One request first: a store that is down or silent fails here, before calls that retry among themselves
        # (s3fs's makedirs asks about the bucket several ways, each waiting its own timeout).
        with_retries(ask_about_root, retry)
        with_retries(lambda: fs.makedirs(root, exist_ok=True), retry)
        with_retries(lambda: fs.pipe_file(probe, b"ok"), retry)
        with_retries(lambda: fs.rm(probe), retry)

    def write_atomic(self, path: str, write) -> None:
        """write(file_object) into a temporary object, then move it to `path`; retried as a whole."""
        with_retries(lambda: self._write_atomic(path, write), self.retry)

    def _write_atomic(self, path: str, write) -> None:
        staging = posixpath.join(self.root, "_staging", f"{uuid.uuid4().hex}-{posixpath.basename(path)}")
        self.fs.makedirs(posixpath.dirname(staging), exist_ok=True)
        with self.fs.open(staging, "wb") as f:
            write(f)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self.fs.mv(staging, path)

    def clean_staging(self) -> None:
        """Drop temporaries; any left there belong to a run that died between writing and moving a file."""
        staging = posixpath.join(self.root, "_staging")
        if self.fs.exists(staging):
            self.fs.rm(staging, recursive=True)

    def write_shard(self, shard_id: str, table: pa.Table, config_hash: str, failure: str | None = None) -> None:
        """The shard's file; for a shard that failed (`failure` says why), its rows so far under _partial/."""
        # The hash also goes where pandas keeps DataFrame.attrs, so pd.read_parquet shows it (df.attrs).
        pandas_attrs = json.dumps({HASH_METADATA_KEY.decode(): config_hash}).encode()
        metadata = {HASH_METADATA_KEY: config_hash.encode(), b"PANDAS_ATTRS": pandas_attrs}
        if failure is not None:
            metadata[FAILURE_METADATA_KEY] = failure.encode()
        table = table.replace_schema_metadata(metadata)
        path = self.shard_path(shard_id) if failure is None else self.partial_path(shard_id)
        # Encoded in memory, then written in one call: pyarrow writes a Python file object in a hundred small
        # pieces, each a call through fsspec, and an object store takes one body as one request.
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer)
        payload = buffer.getvalue()
        self.write_atomic(path, lambda f: f.write(payload))

    def partial_shards(self) -> set[str]:
        """Ids of shards with rows kept from a failed read (a rerun that completes one removes its partial file)."""
        self.fs.invalidate_cache()
        paths = with_retries(lambda: self.fs.glob(self.partial_path("*")), self.retry)
        return {posixpath.basename(p)[: -len(".parquet")] for p in paths}

    def remove_partial(self, shard_id: str) -> None:
        with_retries(lambda: self.fs.rm(self.partial_path(shard_id)), self.retry)

    def read_all(self, columns: list[str]) -> pa.Table:
        self.fs.invalidate_cache()
        parts = []
        for path in sorted(self.fs.glob(posixpath.join(self.root, "*.parquet"))):
            with self.fs.open(path, "rb") as f:
                parts.append(pq.read_table(f, columns=columns))
        return pa.concat_tables(parts) if parts else OUTPUT_SCHEMA.empty_table().select(columns)

    def shards_with_errors(self, shard_ids: set[str]) -> set[str]:
        """Those of `shard_ids` whose files hold error rows (what a rerun with --retry-errors decodes again)."""
        table = self.read_all(["shard_id", "error"])
        table = table.filter(pc.is_valid(table["error"]))
        return set(pc.unique(table["shard_id"]).to_pylist()) & shard_ids

    def write_manifest(self, manifest: dict) -> None:
        payload = json.dumps(manifest, indent=2, sort_keys=True).encode()
        self.write_atomic(posixpath.join(self.root, MANIFEST), lambda f: f.write(payload))


def with_error_kinds(table: pa.Table) -> pa.Table:
    """Every error message as `kind: detail` (specvlm.data.error_kinds). Rows that failed in reading or preparing
    carry their kind already; the engine's messages come bare: its validation refuses a prompt that leaves no room
    in the target's positions (too_long), anything else it reports is decode_failed."""
    errors = table["error"].to_pylist()
    bare = [e is not None and kind_of(e) == OTHER for e in errors]
    if not any(bare):
        return table
    kinds = ["too_long" if "leaves no room" in e else "decode_failed" for e, b in zip(errors, bare) if b]
    it = iter(kinds)
    fixed = [tagged(next(it), e) if b else e for e, b in zip(errors, bare)]
    index = table.schema.get_field_index("error")
    return table.set_column(index, table.schema.field(index), pa.array(fixed, pa.string()))


class ShardCollector:
    """Gathers decoded rows per shard as they stream in, in any order, and finishes each shard once it is complete:
    the row closing it has arrived with the shard's row count (schema.ROW_FIELDS), and so has every row it
    counts (each row_index once).

    A complete shard is written as done output; one that could not be read to its end keeps the rows it did
    yield in _partial/ and goes into `failed`. A shard whose file cannot be written (the store's outage outlasting
    output.retry_for_s) fails too, so the job carries on with the others."""

    def __init__(self, output: OutputDir, config_hash: str, stale_partials: set[str] = frozenset()):
        self.output = output
        self.config_hash = config_hash
        self.parts: dict[str, list[pa.Table]] = {}  # shard id -> its rows received so far
        self.indexes: dict[str, set[int]] = {}  # shard id -> the row_index values among them
        self.closing: dict[str, dict] = {}  # shard id -> {"rows": its row count, "error": why it was cut short}
        self.row_counts: dict[str, int] = {}  # shard id -> its row count, once the row closing it has come
        self.stale_partials = set(stale_partials)  # partial files left by earlier runs
        self.written: dict[str, int] = {}  # shard id -> rows
        self.failed: dict[str, str] = {}  # shard id -> why
        self.kept_partial: set[str] = set()  # failed shards whose rows so far were written to _partial/
        self.tokens = 0  # generated tokens in the shards written
        self.peak_open = 0  # most shards held at once: what a driver crash at the worst moment would lose

    def add(self, batch: pa.Table) -> None:
        # One pass over the batch's small columns in Python, then one `take` per shard: a batch of tiny shards
        # holds dozens of them, and a filter per shard and column cost more than writing the shard.
        ids, ends = batch["shard_id"].to_pylist(), batch["is_end"].to_pylist()
        counts = batch["shard_rows"].to_pylist()
        rows_of: dict[str, list[int]] = {}  # shard id -> positions of its rows in the batch
        closing: dict[str, int] = {}  # shard id -> position of the row that closes it
        for position, (shard, end, count) in enumerate(zip(ids, ends, counts)):
            if shard in self.written or shard in self.failed:
                continue  # a retried read task delivers a finished shard again
            rows_of.setdefault(shard, [])
            if count is not None:
                closing[shard] = position
            if not end:
                rows_of[shard].append(position)
        indexes = batch["row_index"].to_pylist()
        for shard, positions in rows_of.items():
            if shard in closing:
                p = closing[shard]
                self.closing[shard] = {"rows": counts[p], "error": batch["shard_error"][p].as_py()}
                self.row_counts[shard] = counts[p]
            seen = self.indexes.setdefault(shard, set())
            fresh = [p for p in positions if indexes[p] not in seen]  # a retried task may deliver rows again
            if fresh:
                seen.update(indexes[p] for p in fresh)
                self.parts.setdefault(shard, []).append(batch.take(fresh))
            self.peak_open = max(self.peak_open, len(self.open))
            if shard in self.closing and len(seen) == self.closing[shard]["rows"]:
                self._finish(shard)

    def _finish(self, shard: str) -> None:
        failure = self.closing.pop(shard)["error"]
        parts = self.parts.pop(shard, [])
        self.indexes.pop(shard, None)
        schema = pa.schema([*OUTPUT_SCHEMA, pa.field("row_index", pa.int64())])
        table = pa.concat_tables(parts).select(schema.names).cast(schema) if parts else schema.empty_table()
        order = table["row_index"].to_pylist()
        if order != sorted(order):  # rows arrive in shard order unless actors finished them out of it
            table = table.sort_by("row_index")
        table = with_error_kinds(table.select(OUTPUT_SCHEMA.names))
        try:
            if failure is None or table.num_rows:  # a shard that failed before its first row has nothing to keep
                self.output.write_shard(shard, table, self.config_hash, failure)
                if failure is not None:
                    self.kept_partial.add(shard)
            if failure is None and shard in self.stale_partials:
                self.output.remove_partial(shard)
        except Exception as exc:  # the store's outage outlasted the retries: this shard fails, the job goes on
            problem = f"cannot write its output to {self.output.uri} ({describe(exc)})"
            failure = problem if failure is None else f"{failure}; its rows read so far were not kept: {problem}"
        if failure is not None:
            self.failed[shard] = failure
            return
        self.written[shard] = table.num_rows
        self.tokens += int(pc.sum(table["new_tokens"]).as_py() or 0)
        inject_fault("shard_written")

    @property
    def open(self) -> set[str]:
        """Shards with rows or their row count received but not yet finished."""
        return set(self.parts) | set(self.closing)

    def close(self) -> None:
        """The stream has ended: a shard still open lost rows on the way, and fails."""
        for shard in sorted(self.open):
            closing = self.closing.pop(shard, None)
            got = len(self.indexes.pop(shard, ()))
            self.parts.pop(shard, None)
            expected = "an unknown number (its last row never came)" if closing is None else closing["rows"]
            self.failed[shard] = f"only {got} of {expected} rows came back from decoding"
