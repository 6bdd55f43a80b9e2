"""Listing files on any fsspec filesystem, and the ids and URIs the layouts derive from their paths."""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections import Counter

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem


def expand(fs: AbstractFileSystem, path: str) -> tuple[str, list[str]]:
    """(root, sorted file paths) of a directory, a file or a glob. Keys and shard ids are relative to root."""
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
    hidden = {f for f in files if any(part.startswith(".") for part in relative(f, root).split("/"))}
    return root, sorted(files - hidden)


def file_ids(paths: list[str], root: str, suffix: str = "") -> list[str]:
    """Filesystem-safe ids from the paths below root, without their suffix (`suffix`, or else the extension), so an
    id never changes when other files are added later (resume depends on that): "000" for root/000.tar, "a__000"
    for root/a/000.tar."""
    stems = [relative(p, root) for p in paths]
    stems = [s[: -len(suffix)] if suffix else posixpath.splitext(s)[0] for s in stems]
    return unique_ids([re.sub(r"[^A-Za-z0-9._-]", "_", s.replace("/", "__")) for s in stems], stems)


def unique_ids(ids: list[str], rel_paths: list[str]) -> list[str]:
    # Sanitising can map two paths to one id ("a b" and "a_b"); a hash of the path tells them apart.
    counts = Counter(ids)
    return [
        f"{i}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}" if counts[i] > 1 else i for i, rel in zip(ids, rel_paths)
    ]


def to_uri(fs: AbstractFileSystem, path: str) -> str:
    # Local shards keep plain absolute paths; everything else keeps its protocol (s3://, gs://, ...).
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def extension(path: str) -> str:
    return posixpath.splitext(path)[1][1:].lower()


def relative(path: str, root: str) -> str:
    return posixpath.relpath(path, root) if root else path
