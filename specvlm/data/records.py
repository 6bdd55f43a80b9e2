"""What every input layout reads into: shards, the records they yield, and the errors of listing and reading.

The layouts (image folders, WebDataset tars, Parquet files, the benchmark layouts) each build on this module;
`sources.py` dispatches to them.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Literal, TypedDict

from fsspec.core import url_to_fs

from specvlm.data.error_kinds import tagged
from specvlm.data.retry import describe, with_retries

ShardFormat = Literal["images", "webdataset", "parquet", "coco", "vqav2", "scienceqa", "jsonl", "hf"]

# A file or member with one of these extensions is a sample. The first line's formats are those the decoder reads;
# the second's are images it does not read (HEIC, JPEG XL, SVG, camera raw): samples all the same, which become
# error rows saying the image cannot be read, rather than files skipped as if they were not images.
IMAGE_EXTENSIONS = frozenset(
    {"jpg", "jpeg", "jfif", "png", "apng", "webp", "gif", "bmp", "tif", "tiff", "avif"}
    | {"heic", "heif", "jxl", "svg", "dng", "cr2", "cr3", "nef", "arw", "raf"}
)
SIDECAR_EXTENSIONS = frozenset({"txt", "json"})


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
    # What the shard was made from: a digest of its files' names, sizes and versions (ETag or modification time);
    # "" where the listing does not know (benchmark layouts). An image folder's shard id ends with it.
    identity: str = ""
    images: str = ""  # benchmark layouts: the root that image paths in the annotations are relative to
    annotations: str = ""  # vqav2: the answers file
    split: str = ""  # scienceqa: the split kept


class Record(TypedDict):
    key: str  # unique within the shard
    shard_id: str
    source: str  # the file the sample came from: the shard's uri, or an image folder's image file
    image: bytes | None
    caption: str | None
    question: str | None
    choices: list[str] | None
    answer: str | None
    references: list[str] | None  # every reference when the record has several (captions, human answers)
    meta: str | None  # raw JSON text of extra fields
    error: str | None


def record(shard: Shard, key: str, **fields) -> Record:
    """A record of `shard` with every field empty but those given."""
    made = Record(
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
    made.update(fields)
    return made


def sample_record(
    shard: Shard, key: str, image: bytes, sidecars: dict[str, bytes], *, source: str | None = None
) -> Record:
    """A sample's record from its image and its sidecars by extension: "txt" the caption, "json" the task fields
    (caption, question, choices, answer) and metadata. `source`: the image file's URI, where that is not the
    shard's (image folders)."""
    made = record(shard, key, image=image, **({"source": source} if source else {}))
    if "json" in sidecars:
        made["meta"] = sidecars["json"].decode("utf-8", errors="replace")
        try:
            fields = json.loads(made["meta"])
            if not isinstance(fields, dict):
                raise ValueError("not a JSON object")
            choices = fields.get("choices")
            if choices is not None and not isinstance(choices, list):
                raise ValueError("'choices' is not a list")
        except ValueError as e:
            problem = f"bad .json sidecar of {key!r} in {shard.uri} ({e}); fix or remove it"
            made["error"] = tagged("record_invalid", problem)
            return made
        for name in ("caption", "question", "answer"):
            if fields.get(name) is not None:
                made[name] = str(fields[name])
        made["choices"] = None if choices is None else [str(c) for c in choices]
    if "txt" in sidecars:
        made["caption"] = sidecars["txt"].decode("utf-8", errors="replace").strip()
    return made


TASK_FIELDS = ("caption", "question", "choices", "answer", "references")


def task_fields(row: dict) -> dict:
    """A sample from a row's own names (the row is emptied of them): the task's fields; a list caption or answer
    is several references (the first caption, or the consensus answer, is the reference); the rest is metadata."""
    sample = {name: row.pop(name) for name in ("question", "choices", "caption", "answer") if name in row}
    for name, pick in (("caption", lambda refs: refs[0]), ("answer", lambda refs: Counter(refs).most_common(1)[0][0])):
        if isinstance(sample.get(name), list) and sample[name]:
            sample["references"] = [str(r) for r in sample[name]]
            sample[name] = pick(sample["references"])
    if "references" in row:
        sample["references"] = [str(r) for r in row.pop("references")]
    sample["meta"] = row
    return sample


def fields_record(shard: Shard, key: str, sample: dict, image: bytes | str | None) -> Record:
    """The record of a sample (task_fields' form, plus an optional `error`). image: the bytes, None where the
    sample has none, or a message saying why they could not be read."""
    fields = {name: sample.get(name) for name in TASK_FIELDS}
    meta = json.dumps(sample["meta"], ensure_ascii=False, sort_keys=True, default=str) if sample.get("meta") else None
    error = sample.get("error") or (image if isinstance(image, str) else None)
    return record(shard, key, image=image if isinstance(image, bytes) else None, meta=meta, error=error, **fields)


def fetch_image(location: str, root: str, storage_options: dict, advice: str) -> bytes | str:
    """The bytes of the image at `location`, a URI or a path relative to `root`; or, where it cannot be read, the
    error message, ending with `advice`. Transient faults are retried (retry.with_retries)."""
    uri = location if "://" in location or location.startswith("/") else posixpath.join(root, location)
    try:
        fs, path = url_to_fs(uri, **storage_options)
        return with_retries(partial(fs.cat_file, path))
    except OSError as e:
        return tagged("read_failed", f"cannot read image {uri} ({type(e).__name__}: {e}); {advice}")
