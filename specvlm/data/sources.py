"""Shard listing and reading from any fsspec URI: image folders, WebDataset tars, Parquet files, and the
benchmark layouts of `benchmarks.py` (COCO, VQAv2, ScienceQA, JSONL, Hugging Face datasets).

`list_shards` turns a URI (directory, file or glob) into a sorted list of `Shard`s; `read_shard`
streams one `Record` per sample. A bad sample (an undecodable member, a file that is not an
image, bad metadata) becomes a record with `error` set. A shard that cannot be read to its end
raises `ShardError` after the records it did read: its lost samples are unknown, so no record
stands in for them, and the caller can tell a complete shard from a cut one.

This module chooses the layout and retries; each layout's reader is a module of its own (image_folders,
webdataset, tables, benchmarks), all of them built on `records` and `listing`.
"""

from __future__ import annotations

import itertools
import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from fsspec import AbstractFileSystem

from specvlm.data import benchmarks
from specvlm.data.error_kinds import tagged
from specvlm.data.image_folders import ImageFolder, list_folder, read_folder
from specvlm.data.listing import expand, extension, file_ids, identity, is_hidden, relative, to_uri, version
from specvlm.data.records import IMAGE_EXTENSIONS, Record, Shard, ShardError, ShardFormat, SourceError, record
from specvlm.data.retry import DEFAULT_RETRY, RetryPolicy, filesystem, is_transient
from specvlm.data.tables import read_table
from specvlm.data.webdataset import read_tar

__all__ = ["Listing", "Record", "Shard", "ShardError", "SourceError", "list_input", "list_shards", "read_shard"]

_FILE_SUFFIX = {"webdataset": ".tar", "parquet": ".parquet"}


@dataclass(frozen=True)
class Listing:
    """What a URI holds: its shards in order, plus for an image folder the files skipped as not images (paths below
    the folder) and every image's and sidecar's version (`ImageFolder`), from which a resumed job rebuilds shards."""

    shards: list[Shard]
    skipped: tuple[str, ...] = ()
    folder: ImageFolder | None = None


def list_shards(uri: str, format: str = "auto", **options) -> list[Shard]:
    """The shards under `uri` (a directory, a single file or a glob), sorted and deterministic: `list_input`'s."""
    return list_input(uri, format, **options).shards


def list_input(
    uri: str,
    format: str = "auto",
    *,
    storage_options: dict | None = None,
    files_per_shard: int = 1000,
    preflight: bool = False,
    **layout: str | None,
) -> Listing:
    """List the shards under `uri` (a directory, a single file or a glob), sorted and deterministic.
    preflight: wait for object storage only seconds (see retry.filesystem); an error then means "unreachable".
    layout: images, annotations, split, for the benchmark layouts (benchmarks.py)."""
    formats = ("auto", "images", "webdataset", "parquet", *benchmarks.BENCHMARK_FORMATS)
    if format not in formats:
        raise SourceError(f"unknown format {format!r}; use one of {', '.join(formats)}")
    if files_per_shard < 1:
        raise SourceError(f"files_per_shard must be at least 1, got {files_per_shard}")
    if format in benchmarks.BENCHMARK_FORMATS:
        return Listing(
            benchmarks.list_benchmark_shards(
                uri, format, storage_options=storage_options or {}, files_per_shard=files_per_shard, **layout
            )
        )
    fs, path = filesystem(uri, storage_options, preflight=preflight)
    # fsspec keeps one filesystem instance per process with its directory listings cached;
    # a listing must see the store as it is now.
    fs.invalidate_cache()
    try:
        root, files = expand(fs, path)
    except FileNotFoundError:
        files = {}
    if not files:
        raise SourceError(f"{uri} matches no files; check the path, the glob and the storage options")

    shown = [p for p in files if not is_hidden(p, root)]
    images = [p for p in shown if extension(p) in IMAGE_EXTENSIONS]
    metadata = _folder_metadata(shown, images)
    by_format = {
        "webdataset": [p for p in shown if p.lower().endswith(".tar")],
        "parquet": [p for p in shown if p.lower().endswith(".parquet") and p not in metadata],
        "images": images,
    }
    if format == "auto":
        # Tars win over parquet and images, parquet over images: img2dataset writes a metadata .parquet next to
        # each .tar, and parquet data sets often ship example images. A .parquet beside a folder of images with
        # its name is that folder's metadata (img2dataset's "files" layout), and no data set.
        format = next((name for name, matched in by_format.items() if matched), None)
        if format is None:
            raise SourceError(f"{uri} has no .tar, .parquet or image files; pass format= or another URI")
    if not by_format[format]:
        raise SourceError(f"{uri} has no {format} files")
    if format == "images":
        folder, skipped = list_folder(fs, root, files, metadata)
        return Listing(folder.shards(files_per_shard), tuple(skipped), folder)
    return Listing(_file_shards(fs, root, {p: files[p] for p in by_format[format]}, format))


def _folder_metadata(paths: list[str], images: list[str]) -> frozenset[str]:
    """The .parquet files that describe a folder of images beside them, named like it: img2dataset's "files"
    output writes 00000.parquet (and 00000_stats.json) beside the folder 00000/ of 000000001.jpg, .txt, .json."""
    folders = {posixpath.dirname(p) for p in images}
    return frozenset(p for p in paths if p.lower().endswith(".parquet") and posixpath.splitext(p)[0] in folders)


def _file_shards(fs: AbstractFileSystem, root: str, files: dict[str, dict], format: ShardFormat) -> list[Shard]:
    ids = file_ids(list(files), root, _FILE_SUFFIX[format])
    return [
        Shard(
            uri=to_uri(fs, p),
            format=format,
            shard_id=i,
            identity=identity([(relative(p, root), int(info.get("size") or 0), version(info))]),
        )
        for (p, info), i in zip(files.items(), ids)
    ]


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
            for made in _records(shard, fs, path, image_column, storage_options or {}, start=sent):
                yield made
                sent += 1
            return
        except Exception as exc:
            if not (is_transient(exc) and retry.wait(attempt, deadline)):
                raise ShardError(shard, sent, exc) from exc


def _records(
    shard: Shard, fs: AbstractFileSystem, path: str, image_column: str, storage_options: dict, start: int
) -> Iterator[Record]:
    """The shard's records from number `start` on, keys made unique."""
    if shard.format == "images":
        return read_folder(shard, fs, path, start)  # keys are unique file names; fetches only from `start`
    if shard.format == "webdataset":
        records = read_tar(shard, fs, path)
    elif shard.format in ("parquet", "hf"):
        records = read_table(shard, fs, path, image_column, storage_options)
    else:
        records = benchmarks.read_benchmark_shard(shard, storage_options)
    # A tar or Parquet stream cannot be entered in the middle: it is read again from its start, the records
    # already yielded skipped (after key deduplication, so the numbering is the same on every pass).
    return itertools.islice(_unique_keys(shard, records), start, None)


def _unique_keys(shard: Shard, records: Iterator[Record]) -> Iterator[Record]:
    seen = Counter()
    for made in records:
        key = made["key"]
        seen[key] += 1
        if seen[key] > 1:
            error = tagged("record_invalid", f"key {key!r} occurs more than once in {shard.uri}; make keys unique")
            made = record(shard, f"{key}:__duplicate{seen[key] - 1}__", error=error)
        yield made
