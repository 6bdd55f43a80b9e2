"""Image folders as input.

Every image file is a sample, keyed by its path below the folder with its extension (`a.jpg` beside `a.png` are
two samples); `<stem>.txt` (a caption) and `<stem>.json` (task fields, metadata) beside it are its sidecars, shared
by every image of that stem. Files that are plainly not images (`Thumbs.db`, `notes.txt` with no `notes.<image>`,
`.DS_Store` and other hidden files, the metadata img2dataset writes beside its folders) are not samples: the
listing skips them and names them. A file with an image's extension that holds no image is a sample, and
becomes an error row when it is decoded.

A shard is a set of images with their sidecars, named by what it holds: `images-<identity>`, a digest of its
files' names, sizes and versions (ETag, or modification time). A replaced file or a new sidecar gives the shard
another name, so output written from the old contents is never taken for the new; `ImageFolder.shard` rebuilds
the shard of any set of keys, so a resumed job can tell which shards it wrote before still hold what the folder
holds now (pipeline/resume.py).
"""

from __future__ import annotations

import posixpath
from collections import defaultdict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fsspec import AbstractFileSystem
from fsspec.core import strip_protocol

from specvlm.data.error_kinds import tagged
from specvlm.data.listing import extension, identity, is_hidden, relative, to_uri, version
from specvlm.data.records import IMAGE_EXTENSIONS, SIDECAR_EXTENSIONS, Record, Shard, record, sample_record
from specvlm.data.retry import is_transient

_FETCH_THREADS = 16  # concurrent GETs for image folders: object stores have high latency per file
SHARD_PREFIX = "images-"


@dataclass(frozen=True)
class FolderFile:
    uri: str
    size: int
    version: str


@dataclass(frozen=True)
class ImageFolder:
    """The images and sidecars of a listed folder, each with its size and version."""

    uri: str  # the folder
    images: dict[str, FolderFile]  # key (path below the folder, extension kept) -> its file, sorted by key
    sidecars: dict[str, dict[str, FolderFile]]  # stem (key without extension) -> {path below the folder: file}

    def shard(self, keys: Iterable[str]) -> Shard | None:
        """The shard of exactly these images and their sidecars; None when one of them is no longer there."""
        keys = sorted(keys)
        if any(key not in self.images for key in keys):
            return None
        sidecars = {rel: file for key in keys for rel, file in self.sidecars.get(stem(key), {}).items()}
        entries = [(key, self.images[key]) for key in keys] + sorted(sidecars.items())
        digest = identity([(rel, file.size, file.version) for rel, file in entries])
        return Shard(
            uri=self.uri,
            format="images",
            shard_id=f"{SHARD_PREFIX}{digest}",
            files=tuple(file.uri for _, file in entries),
            identity=digest,
        )

    def shards(self, files_per_shard: int, exclude: frozenset[str] = frozenset()) -> list[Shard]:
        """The images not in `exclude`, in sorted order, cut into shards of files_per_shard."""
        keys = [key for key in self.images if key not in exclude]
        return [self.shard(keys[start : start + files_per_shard]) for start in range(0, len(keys), files_per_shard)]


def list_folder(
    fs: AbstractFileSystem, root: str, files: dict[str, dict], metadata: frozenset[str] = frozenset()
) -> tuple[ImageFolder, list[str]]:
    """The folder's images and sidecars, and the paths below root of the files skipped as not images. `files`:
    path -> fsspec info, as listed; `metadata`: paths known to describe the images rather than be samples."""
    images, sidecars, skipped = {}, defaultdict(dict), []
    for path, info in files.items():
        file = FolderFile(to_uri(fs, path), int(info.get("size") or 0), version(info))
        rel = relative(path, root)
        if is_hidden(path, root) or path in metadata:
            skipped.append(rel)
        elif extension(path) in IMAGE_EXTENSIONS:
            images[rel] = file
        elif extension(path) in SIDECAR_EXTENSIONS:
            sidecars[stem(rel)][rel] = file
        else:
            skipped.append(rel)
    stems = {stem(key) for key in images}
    skipped += [rel for s, found in sidecars.items() if s not in stems for rel in found]  # a caption of no image
    sidecars = {s: found for s, found in sidecars.items() if s in stems}
    return ImageFolder(to_uri(fs, root), dict(sorted(images.items())), sidecars), sorted(skipped)


def stem(key: str) -> str:
    return posixpath.splitext(key)[0]


def read_folder(shard: Shard, fs: AbstractFileSystem, root: str, start: int) -> Iterator[Record]:
    """The shard's records from number `start` on; only those are fetched."""
    images, sidecars = [], defaultdict(dict)
    for uri in shard.files:
        path = strip_protocol(uri)
        key = relative(path, root)
        if extension(path) in IMAGE_EXTENSIONS:
            images.append((key, uri, path))
        else:
            sidecars[stem(key)][extension(path)] = path

    def fetch(image: tuple[str, str, str]) -> Record:
        key, uri, path = image
        paths = [path, *sidecars[stem(key)].values()]
        try:
            data = fs.cat_file(path)
            found = {ext: fs.cat_file(p) for ext, p in sidecars[stem(key)].items()}
        except Exception as e:
            if is_transient(e):
                raise  # the whole stream is retried from this sample on
            problem = f"cannot read {', '.join(paths)} ({type(e).__name__}: {e})"
            return record(shard, key, source=uri, error=tagged("read_failed", problem))
        return sample_record(shard, key, data, found, source=uri)

    # map() yields in order; fetching a bounded batch at a time caps how many images sit in memory.
    images = images[start:]
    with ThreadPoolExecutor(_FETCH_THREADS) as pool:
        for first in range(0, len(images), _FETCH_THREADS):
            yield from pool.map(fetch, images[first : first + _FETCH_THREADS])
