"""What every input layout reads into: shards, the records they yield, and the errors of listing and reading.

The layouts (image folders, WebDataset tars, Parquet files, the benchmark layouts) each build on this module;
`sources.py` dispatches to them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal, TypedDict

from specvlm.data.error_kinds import tagged
from specvlm.data.retry import describe

ShardFormat = Literal["images", "webdataset", "parquet", "coco", "vqav2", "scienceqa", "jsonl", "hf"]

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"})
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


def sample_record(shard: Shard, key: str, members: dict[str, bytes]) -> Record:
    """The record for one sample given its members by extension (image folders and tars alike)."""
    images = [ext for ext in members if ext in IMAGE_EXTENSIONS]
    if len(images) != 1:
        problem = "no image member" if not images else f"several image members ({', '.join(images)})"
        kind = "image_missing" if not images else "record_invalid"
        problem = f"{problem} for key {key!r} in {shard.uri}; expected exactly one"
        return record(shard, key, error=tagged(kind, problem))
    made = record(shard, key, image=members[images[0]])
    if "json" in members:
        made["meta"] = members["json"].decode("utf-8", errors="replace")
        try:
            fields = json.loads(made["meta"])
            if not isinstance(fields, dict):
                raise ValueError("not a JSON object")
            choices = fields.get("choices")
            if choices is not None and not isinstance(choices, list):
                raise ValueError("'choices' is not a list")
        except ValueError as e:
            made["error"] = tagged("record_invalid", f"bad {key}.json in {shard.uri} ({e}); fix or remove it")
            return made
        for name in ("caption", "question", "answer"):
            if fields.get(name) is not None:
                made[name] = str(fields[name])
        made["choices"] = None if choices is None else [str(c) for c in choices]
    if "txt" in members:
        made["caption"] = members["txt"].decode("utf-8", errors="replace").strip()
    return made
