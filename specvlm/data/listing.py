"""Listing files on any fsspec filesystem, and the ids and URIs the layouts derive from their paths."""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections import Counter

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem


def expand(fs: AbstractFileSystem, path: str) -> tuple[str, dict[str, dict]]:
    """(root, {file path: its fsspec info}, sorted by path) of a directory, a file or a glob, hidden files
    included (see `is_hidden`). Keys and shard ids are relative to root. The infos come with the listing itself (no
    request per file): sizes and versions (`version`) for the shards' identities."""
    if any(c in path for c in "*?["):
        parts = path.split("/")
        static = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
        root = "/".join(parts[:static]) or ("/" if path.startswith("/") else "")
        matches = fs.glob(path, detail=True)
    elif fs.isdir(path):
        root, matches = path, {path: {"type": "directory"}}
    else:
        root, matches = posixpath.dirname(path), {path: fs.info(path)}
    files = {}
    for match, info in matches.items():
        files.update(fs.find(match, detail=True) if info["type"] == "directory" else {match: info})
    return root, dict(sorted(files.items()))


def is_hidden(path: str, root: str) -> bool:
    """A file under a name starting with "." (macOS "._x.jpg" forks and .DS_Store, .ipynb_checkpoints/): tool
    litter, not data."""
    return any(part.startswith(".") for part in relative(path, root).split("/"))


def visible(fs: AbstractFileSystem, path: str) -> tuple[str, dict[str, dict]]:
    """`expand` without the hidden files."""
    root, files = expand(fs, path)
    return root, {p: info for p, info in files.items() if not is_hidden(p, root)}


# What changes when a file is replaced, by store: S3 and Azure give an ETag, GCS a generation, local disks and most
# others a modification time.
_VERSION_FIELDS = ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "last_modified", "updated")


def version(info: dict) -> str:
    """The file's version as its listing gives it: its ETag, generation or modification time, whichever the store
    has ("" where it has none, and then the size alone tells versions apart)."""
    return next((str(info[name]) for name in _VERSION_FIELDS if info.get(name) is not None), "")


def identity(entries: list[tuple[str, int, str]]) -> str:
    """A digest of (name, size, version) entries: what a shard was made from. Equal digests, equal inputs."""
    lines = sorted(f"{name}\t{size}\t{ver}\n" for name, size, ver in entries)
    return hashlib.sha256("".join(lines).encode()).hexdigest()[:16]


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
