"""Shard listing and reading from any fsspec URI: image folders, WebDataset tars, Parquet files, and the
benchmark layouts of `benchmarks.py` (COCO, VQAv2, ScienceQA, JSONL, Hugging Face datasets).

`list_shards` turns a URI (directory, file or glob) into a sorted list of `Shard`s; `read_shard`
streams one `Record` per sample. A bad sample (an undecodable member, a file that is not an
image, bad metadata) becomes a record with `error` set. A shard that cannot be read to its end
raises `ShardError` after the records it did read: its lost samples are unknown, so no record
stands in for them, and the caller can tell a complete shard from a cut one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import posixpath
import re
import tarfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, TypedDict

import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from fsspec.core import strip_protocol
from fsspec.implementations.local import LocalFileSystem

from specvlm.data.error_kinds import tagged
from specvlm.data.retry import DEFAULT_RETRY, RetryPolicy, describe, filesystem, is_transient

ShardFormat = Literal["images", "webdataset", "parquet", "coco", "vqav2", "scienceqa", "jsonl", "hf"]

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"})
_SIDECAR_EXTENSIONS = frozenset({"txt", "json"})
_FILE_SUFFIX = {"webdataset": ".tar", "parquet": ".parquet"}
_PARQUET_BATCH_ROWS = 64  # rows of image bytes held at once; row groups are read one at a time
_FETCH_THREADS = 16  # concurrent GETs for image folders: object stores have high latency per file


class SourceError(ValueError):
    """A URI or shard that cannot be listed or understood as the requested format."""


class ShardError(Exception):
    """A shard that cannot be read to its end: missing, unreadable, not the format it claims, cut short, or behind
    an outage that outlasted the retries. `read` records were yielded before it; the samples after are unknown."""

    def __init__(self, shard: Shard, read: int, cause: BaseException):
        self.shard, self.read = shard, read
        after = f" after {read} records" if read else ""
        super().__init__(f"cannot read {shard.format} shard {shard.uri}{after} ({describe(cause)})")


@dataclass(frozen=True)
class Shard:
    uri: str  # the file (tar, parquet) or, for image folders, the listed root folder
    format: ShardFormat
    shard_id: str  # unique within a listing, filesystem-safe; names the output file
    files: tuple[str, ...] = field(default=())  # image folders: image and sidecar URIs; annotation layouts: sample ids
    images: str = ""  # benchmark layouts: the root that image paths in the annotations are relative to
    annotations: str = ""  # vqav2: the answers file
    split: str = ""  # scienceqa: the split kept


class Record(TypedDict):
    key: str  # unique within the shard
    shard_id: str
    source: str  # the shard's uri
    image: bytes | None
    caption: str | None
    question: str | None
    choices: list[str] | None
    answer: str | None
    references: list[str] | None  # every reference when the record has several (captions, human answers)
    meta: str | None  # raw JSON text of extra fields
    error: str | None


# ---------------------------------------------------------------- listing


def list_shards(
    uri: str,
    format: str = "auto",
    *,
    storage_options: dict | None = None,
    files_per_shard: int = 1000,
    preflight: bool = False,
    **layout: str | None,
) -> list[Shard]:
    """List the shards under `uri` (a directory, a single file or a glob), sorted and deterministic.
    preflight: wait for object storage only seconds (see retry.filesystem); an error then means "unreachable".
    layout: images, annotations, split, for the benchmark layouts (benchmarks.py)."""
    from specvlm.data import benchmarks  # it builds on this module's Shard and Record

    formats = ("auto", "images", "webdataset", "parquet", *benchmarks.BENCHMARK_FORMATS)
    if format not in formats:
        raise SourceError(f"unknown format {format!r}; use one of {', '.join(formats)}")
    if files_per_shard < 1:
        raise SourceError(f"files_per_shard must be at least 1, got {files_per_shard}")
    if format in benchmarks.BENCHMARK_FORMATS:
        return benchmarks.list_benchmark_shards(
            uri, format, storage_options=storage_options or {}, files_per_shard=files_per_shard, **layout
        )
    fs, path = filesystem(uri, storage_options, preflight=preflight)
    # fsspec keeps one filesystem instance per process with its directory listings cached;
    # a listing must see the store as it is now.
    fs.invalidate_cache()
    try:
        root, paths = _expand(fs, path)
    except FileNotFoundError:
        paths = []
    if not paths:
        raise SourceError(f"{uri} matches no files; check the path, the glob and the storage options")

    by_format = {
        "webdataset": [p for p in paths if p.lower().endswith(".tar")],
        "parquet": [p for p in paths if p.lower().endswith(".parquet")],
        "images": [p for p in paths if _extension(p) in IMAGE_EXTENSIONS],
    }
    if format == "auto":
        # Tars win over parquet and images, parquet over images: img2dataset writes a metadata
        # .parquet next to each .tar, and parquet data sets often ship example images.
        format = next((name for name, matched in by_format.items() if matched), None)
        if format is None:
            raise SourceError(f"{uri} has no .tar, .parquet or image files; pass format= or another URI")
    if not by_format[format]:
        raise SourceError(f"{uri} has no {format} files")
    if format == "images":
        return _image_folder_shards(fs, root, paths, files_per_shard)
    return _file_shards(fs, root, by_format[format], format)


def _expand(fs: AbstractFileSystem, path: str) -> tuple[str, list[str]]:
    """(root, sorted file paths). Keys and shard ids are relative to root."""
    if any(c in path for c in "*?["):
        parts = path.split("/")
        static = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
        root = "/".join(parts[:static]) or ("/" if path.startswith("/") else "")
        matches = fs.glob(path, detail=True)
    elif fs.isdir(path):
        root, matches = path, {path: {"type": "directory"}}
    else:
        root, matches = posixpath.dirname(path), {path: fs.info(path)}
    files = set()
    for match, info in matches.items():
        files.update(fs.find(match) if info["type"] == "directory" else [match])
    # Hidden files and folders are tool litter (macOS "._x.jpg" forks, .ipynb_checkpoints/), not data.
    hidden = {f for f in files if any(part.startswith(".") for part in _relative(f, root).split("/"))}
    return root, sorted(files - hidden)


def _file_shards(fs: AbstractFileSystem, root: str, paths: list[str], format: ShardFormat) -> list[Shard]:
    # The id is the path below root without the suffix, so it never changes when other shards are
    # added later (resume depends on that): "000" for root/000.tar, "a__000" for root/a/000.tar.
    suffix = len(_FILE_SUFFIX[format])
    rel_ids = [_relative(p, root)[:-suffix] for p in paths]
    ids = _unique_ids([re.sub(r"[^A-Za-z0-9._-]", "_", rel.replace("/", "__")) for rel in rel_ids], rel_ids)
    return [Shard(uri=_to_uri(fs, p), format=format, shard_id=i) for p, i in zip(paths, ids)]


def _unique_ids(ids: list[str], rel_paths: list[str]) -> list[str]:
    # Sanitising can map two paths to one id ("a b" and "a_b"); a hash of the path tells them apart.
    counts = Counter(ids)
    return [
        f"{i}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}" if counts[i] > 1 else i for i, rel in zip(ids, rel_paths)
    ]


def _image_folder_shards(fs: AbstractFileSystem, root: str, paths: list[str], files_per_shard: int) -> list[Shard]:
    # A sample is every file sharing a stem: an image plus optional <stem>.txt / <stem>.json sidecars. A stem
    # without an image (README.md, a stray caption) is a sample too and becomes an error record when read, as
    # it does in a tar. Samples, not files, are chunked, so a sidecar always lands in the same shard as its image.
    samples: dict[str, list[str]] = defaultdict(list)
    for p in paths:
        samples[_stem_key(root, p)].append(p)
    keys = sorted(samples)
    root_uri = _to_uri(fs, root)
    return [
        Shard(
            uri=root_uri,
            format="images",
            shard_id=f"images-{n:05d}",
            files=tuple(_to_uri(fs, p) for k in keys[start : start + files_per_shard] for p in samples[k]),
        )
        for n, start in enumerate(range(0, len(keys), files_per_shard))
    ]


def _to_uri(fs: AbstractFileSystem, path: str) -> str:
    # Local shards keep plain absolute paths; everything else keeps its protocol (s3://, gs://, ...).
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _extension(path: str) -> str:
    return posixpath.splitext(path)[1][1:].lower()


def _relative(path: str, root: str) -> str:
    return posixpath.relpath(path, root) if root else path


def _stem_key(root: str, path: str) -> str:
    return posixpath.splitext(_relative(path, root))[0]


# ---------------------------------------------------------------- reading


def read_shard(
    shard: Shard,
    *,
    storage_options: dict | None = None,
    image_column: str = "image",
    retry: RetryPolicy = DEFAULT_RETRY,
) -> Iterator[Record]:
    """Yield one record per sample of `shard`. Keys are unique within the shard.

    A failure that may pass (a dropped connection, throttling, a response cut short) reopens the
    shard and resumes after the records already yielded, with backoff, until `retry`'s budget is
    spent. A shard that still cannot be read to its end raises ShardError after the records it did
    yield: truncated, unreadable, missing, or behind a lasting outage.
    """
    fs, path = filesystem(shard.uri, storage_options)
    deadline, sent = retry.deadline(), 0
    for attempt in itertools.count():
        try:
            for record in _records(shard, fs, path, image_column, storage_options or {}, start=sent):
                yield record
                sent += 1
            return
        except Exception as exc:
            if not (is_transient(exc) and retry.wait(attempt, deadline)):
                raise ShardError(shard, sent, exc) from exc


def _records(
    shard: Shard, fs: AbstractFileSystem, path: str, image_column: str, storage_options: dict, start: int
) -> Iterator[Record]:
    """The shard's records from number `start` on, keys made unique."""
    from specvlm.data import benchmarks  # it builds on this module's Shard and Record

    if shard.format == "images":
        return _read_image_folder(shard, fs, path, start)  # keys are unique stems; fetches only from `start`
    if shard.format == "webdataset":
        records = _read_webdataset(shard, fs, path)
    elif shard.format in benchmarks.BENCHMARK_FORMATS:
        records = benchmarks.read_benchmark_shard(shard, storage_options)
    else:
        records = _read_parquet(shard, fs, path, image_column)
    # A tar or Parquet stream cannot be entered in the middle: it is read again from its start, the records
    # already yielded skipped (after key deduplication, so the numbering is the same on every pass).
    return itertools.islice(_unique_keys(shard, records), start, None)


def _unique_keys(shard: Shard, records: Iterator[Record]) -> Iterator[Record]:
    seen = Counter()
    for record in records:
        key = record["key"]
        seen[key] += 1
        if seen[key] > 1:
            error = tagged("record_invalid", f"key {key!r} occurs more than once in {shard.uri}; make keys unique")
            record = _record(shard, f"{key}:__duplicate{seen[key] - 1}__", error=error)
        yield record


def _record(shard: Shard, key: str, **fields) -> Record:
    record = Record(
        key=key,
        shard_id=shard.shard_id,
        source=shard.uri,
        image=None,
        caption=None,
        question=None,
        choices=None,
        answer=None,
        references=None,
        meta=None,
        error=None,
    )
    record.update(fields)
    return record


def _sample_record(shard: Shard, key: str, members: dict[str, bytes]) -> Record:
    """The record for one sample given its members by extension (image folders and tars alike)."""
    images = [ext for ext in members if ext in IMAGE_EXTENSIONS]
    if len(images) != 1:
        problem = "no image member" if not images else f"several image members ({', '.join(images)})"
        kind = "image_missing" if not images else "record_invalid"
        problem = f"{problem} for key {key!r} in {shard.uri}; expected exactly one"
        return _record(shard, key, error=tagged(kind, problem))
    record = _record(shard, key, image=members[images[0]])
    if "json" in members:
        record["meta"] = members["json"].decode("utf-8", errors="replace")
        try:
            fields = json.loads(record["meta"])
            if not isinstance(fields, dict):
                raise ValueError("not a JSON object")
            choices = fields.get("choices")
            if choices is not None and not isinstance(choices, list):
                raise ValueError("'choices' is not a list")
        except ValueError as e:
            record["error"] = tagged("record_invalid", f"bad {key}.json in {shard.uri} ({e}); fix or remove it")
            return record
        for name in ("caption", "question", "answer"):
            if fields.get(name) is not None:
                record[name] = str(fields[name])
        record["choices"] = None if choices is None else [str(c) for c in choices]
    if "txt" in members:
        record["caption"] = members["txt"].decode("utf-8", errors="replace").strip()
    return record


def _read_image_folder(shard: Shard, fs: AbstractFileSystem, root: str, start: int) -> Iterator[Record]:
    samples: dict[str, dict[str, str]] = defaultdict(dict)
    for uri in shard.files:
        path = strip_protocol(uri)
        samples[_stem_key(root, path)][_extension(path)] = path

    def fetch(key: str) -> Record:
        files = samples[key]
        if not IMAGE_EXTENSIONS & files.keys():
            names = ", ".join(sorted(posixpath.basename(p) for p in files.values()))
            return _record(
                shard,
                key,
                error=tagged(
                    "image_missing",
                    f"no image for key {key!r} ({names}): an image folder holds {'/'.join(sorted(IMAGE_EXTENSIONS))} "
                    "files, each with optional .txt/.json sidecars of the same name; remove or rename the file",
                ),
            )
        try:
            # Extensions other than images and sidecars are skipped unread, as in a tar.
            members = {ext: fs.cat_file(p) for ext, p in files.items() if ext in IMAGE_EXTENSIONS | _SIDECAR_EXTENSIONS}
        except Exception as e:
            if is_transient(e):
                raise  # the whole stream is retried from this sample on
            problem = f"cannot read {sorted(files.values())} ({type(e).__name__}: {e})"
            return _record(shard, key, error=tagged("read_failed", problem))
        return _sample_record(shard, key, members)

    # map() yields in order; fetching a bounded batch at a time caps how many images sit in memory.
    keys = list(samples)[start:]
    with ThreadPoolExecutor(_FETCH_THREADS) as pool:
        for first in range(0, len(keys), _FETCH_THREADS):
            yield from pool.map(fetch, keys[first : first + _FETCH_THREADS])


def _read_webdataset(shard: Shard, fs: AbstractFileSystem, path: str) -> Iterator[Record]:
    # Stream mode ("r|") reads members in order without seeking, so a multi-GB shard is never held
    # in memory or on disk. A sample's members are adjacent; the key is the name up to the first dot.
    key, members = None, {}
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            directory, base = posixpath.split(member.name)
            if not member.isfile() or base.startswith("."):
                continue
            stem, _, ext = base.partition(".")
            if posixpath.join(directory, stem) != key:
                if key is not None:
                    yield _sample_record(shard, key, members)
                key, members = posixpath.join(directory, stem), {}
            ext = ext.lower()
            if ext in IMAGE_EXTENSIONS | _SIDECAR_EXTENSIONS:  # unread members are skipped, not buffered
                members[ext] = tar.extractfile(member).read()
        # tarfile treats a stream cut at (or inside) a member header as a normal end; a complete
        # archive has end-of-archive blocks after the last member, so their absence means truncation.
        if getattr(tar.fileobj, "comptype", "tar") == "tar" and fs.size(path) < tar.offset + tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"no end-of-archive marker, the tar ends early (last sample {key!r} dropped)")
    if key is not None:
        yield _sample_record(shard, key, members)


def _read_parquet(shard: Shard, fs: AbstractFileSystem, path: str, image_column: str) -> Iterator[Record]:
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
                yield _record(
                    shard,
                    key,
                    image=image,
                    meta=json.dumps(extra, ensure_ascii=False, default=str) if extra else None,
                    error=None if image else tagged("image_missing", f"{missing} in column {image_column!r}"),
                    **{name: values.get(name) for name in text_fields},
                )
                row += 1
