"""WebDataset tars as input: a sample is the members that share a key, the member name up to its first dot."""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator

from fsspec import AbstractFileSystem

from specvlm.data.records import IMAGE_EXTENSIONS, SIDECAR_EXTENSIONS, Record, Shard, sample_record


def read_tar(shard: Shard, fs: AbstractFileSystem, path: str) -> Iterator[Record]:
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
                    yield sample_record(shard, key, members)
                key, members = posixpath.join(directory, stem), {}
            ext = ext.lower()
            if ext in IMAGE_EXTENSIONS | SIDECAR_EXTENSIONS:  # unread members are skipped, not buffered
                members[ext] = tar.extractfile(member).read()
        # tarfile treats a stream cut at (or inside) a member header as a normal end; a complete
        # archive has end-of-archive blocks after the last member, so their absence means truncation.
        if getattr(tar.fileobj, "comptype", "tar") == "tar" and fs.size(path) < tar.offset + tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"no end-of-archive marker, the tar ends early (last sample {key!r} dropped)")
    if key is not None:
        yield sample_record(shard, key, members)
