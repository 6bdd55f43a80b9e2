"""Image folders as input: every image file (with optional <stem>.txt / <stem>.json sidecars) is a sample."""

from __future__ import annotations

import posixpath
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from fsspec import AbstractFileSystem
from fsspec.core import strip_protocol

from specvlm.data.error_kinds import tagged
from specvlm.data.listing import extension, relative, to_uri
from specvlm.data.records import IMAGE_EXTENSIONS, SIDECAR_EXTENSIONS, Record, Shard, record, sample_record
from specvlm.data.retry import is_transient

_FETCH_THREADS = 16  # concurrent GETs for image folders: object stores have high latency per file


def folder_shards(fs: AbstractFileSystem, root: str, paths: list[str], files_per_shard: int) -> list[Shard]:
    # A sample is every file sharing a stem: an image plus optional <stem>.txt / <stem>.json sidecars. A stem
    # without an image (README.md, a stray caption) is a sample too and becomes an error record when read, as
    # it does in a tar. Samples, not files, are chunked, so a sidecar always lands in the same shard as its image.
    samples: dict[str, list[str]] = defaultdict(list)
    for p in paths:
        samples[_stem_key(root, p)].append(p)
    keys = sorted(samples)
    root_uri = to_uri(fs, root)
    return [
        Shard(
            uri=root_uri,
            format="images",
            shard_id=f"images-{n:05d}",
            files=tuple(to_uri(fs, p) for k in keys[start : start + files_per_shard] for p in samples[k]),
        )
        for n, start in enumerate(range(0, len(keys), files_per_shard))
    ]


def _stem_key(root: str, path: str) -> str:
    return posixpath.splitext(relative(path, root))[0]


def read_folder(shard: Shard, fs: AbstractFileSystem, root: str, start: int) -> Iterator[Record]:
    """The shard's records from number `start` on; only those are fetched."""
    samples: dict[str, dict[str, str]] = defaultdict(dict)
    for uri in shard.files:
        path = strip_protocol(uri)
        samples[_stem_key(root, path)][extension(path)] = path

    def fetch(key: str) -> Record:
        files = samples[key]
        if not IMAGE_EXTENSIONS & files.keys():
            names = ", ".join(sorted(posixpath.basename(p) for p in files.values()))
            return record(
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
            members = {ext: fs.cat_file(p) for ext, p in files.items() if ext in IMAGE_EXTENSIONS | SIDECAR_EXTENSIONS}
        except Exception as e:
            if is_transient(e):
                raise  # the whole stream is retried from this sample on
            problem = f"cannot read {sorted(files.values())} ({type(e).__name__}: {e})"
            return record(shard, key, error=tagged("read_failed", problem))
        return sample_record(shard, key, members)

    # map() yields in order; fetching a bounded batch at a time caps how many images sit in memory.
    keys = list(samples)[start:]
    with ThreadPoolExecutor(_FETCH_THREADS) as pool:
        for first in range(0, len(keys), _FETCH_THREADS):
            yield from pool.map(fetch, keys[first : first + _FETCH_THREADS])
