"""WebDataset tars as input.

A sample is the adjacent members that share a key, the member name up to the first dot of its base name
(`000.jpg`, `000.txt`, `000.json` are sample `000`), as WebDataset groups them; `<key>.txt` is its caption and
`<key>.json` its task fields and metadata. Every member whose name ends with an image extension gets a row or a
named error row:

- a sample with exactly one `<key>.<image extension>` member is one row keyed `<key>`; its image members with a
  longer extension (`000.seg.png`, a mask) are WebDataset fields of that sample, not samples;
- otherwise each image member is a row of its own keyed by its name (`a.jpg` and `a.png`; `img.001.png`;
  `photo.v1.png` and `photo.v2.png`), its sidecars `<name without extension>.txt/.json` or else the sample's;
- a hard link (GNU tar writes a file's second name as one) or a symbolic link reads the earlier member it points
  to; a link to a member that is not earlier in the archive, or outside it, is an error row naming both;
- a name that occurs again (`tar -r` appends a new copy) is read once, the first time: the repeat is an error row.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from fsspec import AbstractFileSystem

from specvlm.data.error_kinds import tagged
from specvlm.data.records import IMAGE_EXTENSIONS, SIDECAR_EXTENSIONS, Record, Shard, record, sample_record

_MAX_LINK_HOPS = 8  # a link to a link ...: a cycle of links ends here


@dataclass(frozen=True)
class _Member:
    name: str  # as in the archive
    ext: str  # everything after the first dot of the base name, lower case: "jpg", "seg.png", "v1.txt"
    data: bytes | None
    problem: str | None = None  # why there is no data: a link that cannot be followed

    @property
    def last_ext(self) -> str:
        return self.ext.rsplit(".", 1)[-1]


def read_tar(shard: Shard, fs: AbstractFileSystem, path: str) -> Iterator[Record]:
    # Stream mode ("r|") reads members in order without seeking, so a multi-GB shard is never held in memory or
    # on disk; only the current sample's members are.
    key, members, unread, names = None, [], False, Counter()
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        links = _Links(shard, fs, path, compressed=getattr(tar.fileobj, "comptype", "tar") != "tar")
        for member in tar:
            directory, base = posixpath.split(member.name)
            if base.startswith(".") or not (member.isfile() or member.islnk() or member.issym()):
                continue
            stem, _, ext = base.partition(".")
            if posixpath.join(directory, stem) != key:
                if members or unread:
                    yield from _sample_records(shard, key, members)
                key, members, unread = posixpath.join(directory, stem), [], False
            links.remember(member)
            ext = ext.lower()
            if ext.rsplit(".", 1)[-1] not in IMAGE_EXTENSIONS | SIDECAR_EXTENSIONS:
                unread = True  # unread members are skipped, not buffered; a sample of them alone has no image
                continue
            names[member.name] += 1
            if names[member.name] > 1:
                yield _repeat(shard, member.name, names[member.name])
                continue
            members.append(_Member(member.name, ext, *links.read(tar, member)))
        # tarfile treats a stream cut at (or inside) a member header as a normal end; a complete
        # archive has end-of-archive blocks after the last member, so their absence means truncation.
        if not links.compressed and fs.size(path) < tar.offset + tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"no end-of-archive marker, the tar ends early (last sample {key!r} dropped)")
    if members or unread:
        yield from _sample_records(shard, key, members)


def _sample_records(shard: Shard, key: str, members: list[_Member]) -> Iterator[Record]:
    images = [m for m in members if m.last_ext in IMAGE_EXTENSIONS]
    texts = {m.ext: m for m in members if m.last_ext in SIDECAR_EXTENSIONS and m.data is not None}
    plain = [m for m in images if m.ext in IMAGE_EXTENSIONS]
    if not images:
        problem = f"no image member for key {key!r} in {shard.uri}; expected one"
        yield record(shard, key, error=tagged("image_missing", problem))
    elif len(plain) == 1:
        yield _image_record(shard, key, plain[0], texts, "")
    else:
        for image in images:
            prefix = image.ext.rsplit(".", 1)[0] + "." if "." in image.ext else ""
            yield _image_record(shard, image.name, image, texts, prefix)


def _image_record(shard: Shard, key: str, image: _Member, texts: dict[str, _Member], prefix: str) -> Record:
    if image.data is None:
        return record(shard, key, error=tagged("image_missing", image.problem))
    sidecars = {}
    for ext in SIDECAR_EXTENSIONS:
        found = texts.get(prefix + ext) or texts.get(ext)  # the image's own (photo.v1.txt), else the sample's
        if found is not None:
            sidecars[ext] = found.data
    return sample_record(shard, key, image.data, sidecars)


def _repeat(shard: Shard, name: str, count: int) -> Record:
    problem = (
        f"member {name!r} occurs {count} times in {shard.uri} (a copy appended later, as tar -r does?); the first "
        "is read, the repeat is not: remove the repeat, or rename it if it is another image"
    )
    return record(shard, f"{name}:__duplicate{count - 1}__", error=tagged("record_invalid", problem))


class _Links:
    """Where each regular member's data lies in the archive, so that a link member can read the member it points
    to. A stream is never rewound: an uncompressed archive's member is read back by its byte range; a compressed
    one's by reading the archive again up to that member (links are rare, and GNU tar writes a hard link's data
    before the link)."""

    def __init__(self, shard: Shard, fs: AbstractFileSystem, path: str, compressed: bool):
        self.shard, self.fs, self.path, self.compressed = shard, fs, path, compressed
        self.extents: dict[str, tuple[int, int]] = {}  # normalised name -> (data offset, size), first copy only
        self.targets: dict[str, str] = {}  # normalised link name -> normalised target name

    def remember(self, member: tarfile.TarInfo) -> None:
        name = posixpath.normpath(member.name)
        if member.isfile():
            self.extents.setdefault(name, (member.offset_data, member.size))
        else:
            self.targets.setdefault(name, _link_target(member))

    def read(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> tuple[bytes | None, str | None]:
        """The member's data, or None and what keeps it from being read."""
        if member.isfile():
            return tar.extractfile(member).read(), None
        kind = "hard link" if member.islnk() else "symbolic link"
        target = self.targets[posixpath.normpath(member.name)]
        for _ in range(_MAX_LINK_HOPS):
            if target in self.extents or target not in self.targets:
                break
            target = self.targets[target]
        if target not in self.extents:
            where = "outside the archive" if target.startswith("../") or target.startswith("/") else "not earlier in it"
            problem = (
                f"member {member.name!r} of {self.shard.uri} is a {kind} to {member.linkname!r}, which is {where}; "
                "store the file itself in the archive (tar --hard-dereference / --dereference)"
            )
            return None, problem
        offset, size = self.extents[target]
        if not self.compressed:
            return self.fs.cat_file(self.path, start=offset, end=offset + size), None
        return self._read_again(target), None

    def _read_again(self, target: str) -> bytes:
        with self.fs.open(self.path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if member.isfile() and posixpath.normpath(member.name) == target:
                    return tar.extractfile(member).read()
        raise tarfile.ReadError(f"member {target!r} of {self.shard.uri} was there on the first reading, not now")


def _link_target(member: tarfile.TarInfo) -> str:
    """The normalised name a link member points to: a hard link names a member; a symbolic link a path relative to
    its own folder, or an absolute one (never followed outside the archive)."""
    if member.islnk():
        return posixpath.normpath(member.linkname)
    if member.linkname.startswith("/"):
        return member.linkname
    return posixpath.normpath(posixpath.join(posixpath.dirname(member.name), member.linkname))
