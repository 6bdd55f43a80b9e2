"""WebDataset tars whose members are links, repeats or dotted names: every image member gets its row or a named
error row. The tars are written by tarfile from real files on disk (hard links, symbolic links), as GNU tar
writes them: a hard-linked file's second name is a hard-link member."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from specvlm.data.sources import list_shards, read_shard


def _image(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buffer, "PNG")
    return buffer.getvalue()


RED, GREEN, BLUE = _image("red"), _image("green"), _image("blue")


def _tar_of(folder: Path, names: list[str], out: Path, mode: str = "w") -> str:
    """Archive folder's `names` in this order, as `tar -cf out -C folder names...` would."""
    with tarfile.open(out, mode) as tar:
        for name in names:
            tar.add(folder / name, arcname=name, recursive=False)
    return str(out)


def _rows(path: str) -> list[tuple[str, bytes | None, str | None, str | None]]:
    (shard,) = list_shards(path)
    return [(r["key"], r["image"], r["caption"], r["error"]) for r in read_shard(shard)]


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_hard_and_symbolic_links_read_the_member_they_point_to(tmp_path, mode):
    files = tmp_path / "files"
    files.mkdir()
    (files / "a.png").write_bytes(RED)
    (files / "a.txt").write_bytes(b"red")
    os.link(files / "a.png", files / "b.png")  # the archive's second name of a.png: a hard-link member
    os.symlink("a.png", files / "c.png")
    os.symlink("../elsewhere.png", files / "d.png")  # points outside the archive
    os.symlink("z.png", files / "e.png")  # to a member later in the archive
    (files / "z.png").write_bytes(GREEN)
    path = _tar_of(files, ["a.png", "a.txt", "b.png", "c.png", "d.png", "e.png", "z.png"], tmp_path / "000.tar", mode)
    with tarfile.open(path) as tar:
        assert [m.type for m in tar.getmembers()][2:5] == [tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.SYMTYPE]

    rows = _rows(path)
    assert [(key, image, caption) for key, image, caption, _ in rows] == [
        ("a", RED, "red"),
        ("b", RED, None),
        ("c", RED, None),
        ("d", None, None),
        ("e", None, None),
        ("z", GREEN, None),
    ]
    errors = {key: error for key, _, _, error in rows if error}
    assert sorted(errors) == ["d", "e"]
    assert "'d.png'" in errors["d"] and "'../elsewhere.png', which is outside the archive" in errors["d"]
    assert "'z.png', which is not earlier in it" in errors["e"] and "--dereference" in errors["e"]


def test_a_repeated_member_is_read_once_and_the_repeat_is_an_error_row(tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    (files / "a.png").write_bytes(RED)
    (files / "b.png").write_bytes(GREEN)
    path = _tar_of(files, ["a.png", "b.png"], tmp_path / "000.tar")
    (files / "a.png").write_bytes(BLUE)
    _tar_of(files, ["a.png"], tmp_path / "000.tar", mode="a")  # tar -rf 000.tar a.png: a second a.png at the end

    rows = _rows(path)
    assert [(key, image) for key, image, _, _ in rows] == [("a", RED), ("b", GREEN), ("a.png:__duplicate1__", None)]
    assert rows[2][3].startswith("record_invalid: member 'a.png' occurs 2 times")


def test_dotted_names_give_a_row_per_image(tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    for name, data in [
        ("img.001.png", RED),
        ("photo.v1.png", GREEN),
        ("photo.v1.txt", b"first"),
        ("photo.v2.png", BLUE),
        ("photo.txt", b"the sample's caption"),
        ("shot.jpg", RED),
        ("shot.seg.png", GREEN),  # a mask: a field of sample shot, not a sample
        ("two.jpg", RED),
        ("two.png", BLUE),
    ]:
        (files / name).write_bytes(data)
    names = sorted(p.name for p in files.iterdir())
    rows = _rows(_tar_of(files, names, tmp_path / "000.tar"))
    assert rows == [
        ("img.001.png", RED, None, None),
        ("photo.v1.png", GREEN, "first", None),
        ("photo.v2.png", BLUE, "the sample's caption", None),
        ("shot", RED, None, None),
        ("two.jpg", RED, None, None),
        ("two.png", BLUE, None, None),
    ]
