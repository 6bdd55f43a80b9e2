"""What a job still has to write, given what its output already holds.

Shards of tars and Parquet files are files: a rerun skips those whose output file exists (`OutputDir.finished`).
An image folder's shards are cut from a listing that changes between runs (images added, removed, replaced) and by
`input.files_per_shard`, which may change too, so a folder's plan starts from the output instead:

- Each output file `images-<identity>.parquet` names what it was made from (image_folders.py: a digest of its
  images' and sidecars' names, sizes and versions), and its rows' keys say which images those were. Rebuilt from the
  folder as it is now, a shard with the same identity is finished: it is kept, whatever files_per_shard cut it.
- A shard whose images or sidecars changed since, or lost some of them, is superseded: its file is moved to
  `_superseded/` (out of the output, which pyarrow and `<output>/*.parquet` readers skip, but kept), and its images
  that are still there are decoded again with the new ones.
- The images no finished shard holds are cut into new shards of files_per_shard, in sorted order.

So every image of the folder has exactly one row in the output, and no row describes a file as it no longer is.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from functools import partial

import pyarrow.parquet as pq

from pipeline.sink import MANIFEST, OutputDir
from specvlm.data.image_folders import SHARD_PREFIX, ImageFolder
from specvlm.data.records import Shard
from specvlm.data.retry import with_retries
from specvlm.data.sources import Listing

SUPERSEDED = "_superseded"
KEYS_NAMED = 3  # keys named in a superseded shard's reason; the manifest has the rest


@dataclass(frozen=True)
class ShardPlan:
    """The job's shards in order (finished ones among them, which the job skips), the shards an earlier run wrote
    that no longer match the input (id -> what changed), and the files the listing skipped as not images."""

    shards: list[Shard]
    superseded: dict[str, str] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()

    def report(self, output_uri: str) -> list[str]:
        """What the job's log says once, before decoding: the files skipped, the shards superseded."""
        lines = []
        if self.skipped:
            named = ", ".join(self.skipped[:KEYS_NAMED]) + (", ..." if len(self.skipped) > KEYS_NAMED else "")
            lines.append(
                f"{len(self.skipped)} files skipped as not images ({named}; all are listed under skipped_files in "
                f"{output_uri}/{MANIFEST})"
            )
        if self.superseded:
            lines.append(
                f"{len(self.superseded)} shards written by an earlier run no longer match the folder: their images are "
                f"decoded again, their old files moved to {output_uri}/{SUPERSEDED}/"
            )
            lines += [f"  {shard_id}: {why}" for shard_id, why in sorted(self.superseded.items())]
        return lines

    def manifest(self) -> dict:
        """The manifest's record of the input: each shard's identity (a digest of its files' names, sizes and
        versions), the shards superseded this run and why, the files skipped as not images."""
        return {
            "shard_identities": {s.shard_id: s.identity for s in self.shards},
            "shards_superseded_this_run": self.superseded,
            "skipped_files": {"count": len(self.skipped), "files": list(self.skipped)},
        }

    def set_aside_superseded(self, output: OutputDir) -> None:
        """Move the superseded shards' files out of the output, so that their rows are never read beside the rows
        that replace them."""
        for shard_id in sorted(self.superseded):
            target = posixpath.join(output.root, SUPERSEDED, f"{shard_id}.parquet")
            with_retries(partial(_move, output, output.shard_path(shard_id), target), output.retry)


def plan_shards(
    listing: Listing, output: OutputDir, config_hash: str, files_per_shard: int, prompt_rows: bool
) -> ShardPlan:
    """The plan for `listing` against `output`. prompt_rows: the job writes a row per prompt, keyed
    "<record key>#<prompt name>" (task.prompts). Raises ResumeConflict over output made with other settings."""
    if listing.folder is None:
        return ShardPlan(listing.shards, skipped=listing.skipped)
    folder = listing.folder
    kept: list[Shard] = []
    covered: set[str] = set()
    superseded: dict[str, str] = {}
    for shard_id in sorted(i for i in output.finished(config_hash) if i.startswith(SHARD_PREFIX)):
        keys = _written_keys(output, shard_id, prompt_rows)
        rebuilt = folder.shard(keys)
        if rebuilt is not None and rebuilt.shard_id == shard_id and not keys & covered:
            kept.append(rebuilt)
            covered |= keys
        else:
            superseded[shard_id] = _what_changed(folder, keys, covered)
    new = folder.shards(files_per_shard, exclude=frozenset(covered))
    # A folder shard's first file is its first image (image_folders.py): the shards in the order of their images.
    return ShardPlan(sorted(kept + new, key=lambda s: s.files[0]), superseded, listing.skipped)


def _written_keys(output: OutputDir, shard_id: str, prompt_rows: bool) -> set[str]:
    def read() -> list[str]:
        with output.fs.open(output.shard_path(shard_id), "rb") as f:
            return pq.read_table(f, columns=["key"])["key"].to_pylist()

    keys = with_retries(read, output.retry)
    # A prompt's name has no "#" (config.PROMPT_NAME), so the last "#" ends the record's key.
    return {key.rsplit("#", 1)[0] for key in keys} if prompt_rows else set(keys)


def _what_changed(folder: ImageFolder, keys: set[str], covered: set[str]) -> str:
    gone = sorted(k for k in keys if k not in folder.images)
    if gone:
        named = ", ".join(gone[:KEYS_NAMED]) + (f" and {len(gone) - KEYS_NAMED} more" if len(gone) > KEYS_NAMED else "")
        return f"{len(gone)} of its {len(keys)} images are no longer in the folder ({named})"
    if keys & covered:
        return "its images are in another finished shard too (written by an earlier run with other files_per_shard)"
    return "an image or sidecar of it was replaced or edited since (its size or version differs)"


def _move(output: OutputDir, source: str, target: str) -> None:
    output.fs.makedirs(posixpath.dirname(target), exist_ok=True)
    output.fs.mv(source, target)
