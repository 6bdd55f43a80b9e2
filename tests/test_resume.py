"""Resuming an image folder whose files changed between runs (pipeline/resume.py), run as a job runs it minus the
decoding: plan the shards against the output, set superseded ones aside, write each pending shard's records. The
output must hold every image of the folder exactly once, each row made from the file as it is now."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.resume import SUPERSEDED, ShardPlan, plan_shards
from pipeline.sink import OutputDir
from specvlm.data.sources import list_input, read_shard

CONFIG_HASH = "0123456789abcdef"


def _digest(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def run(folder: Path, out: Path, files_per_shard: int, prompts: tuple[str, ...] = ()) -> tuple[ShardPlan, set[str]]:
    """One run: the plan, and the shard ids it wrote. A row per record (and prompt) with its image's digest."""
    output = OutputDir(str(out), {})
    listing = list_input(str(folder), files_per_shard=files_per_shard)
    plan = plan_shards(listing, output, CONFIG_HASH, files_per_shard, prompt_rows=bool(prompts))
    done = output.finished(CONFIG_HASH)
    plan.set_aside_superseded(output)
    written = set()
    for shard in plan.shards:
        if shard.shard_id in done:
            continue
        rows = [
            {"key": f"{r['key']}#{p}" if p else r["key"], "shard_id": r["shard_id"], "image": _digest(r["image"])}
            for r in read_shard(shard)
            for p in (prompts or [None])
        ]
        output.write_shard(shard.shard_id, pa.Table.from_pylist(rows), CONFIG_HASH)
        written.add(shard.shard_id)
    return plan, written


def output_rows(out: Path) -> list[tuple[str, str]]:
    tables = [pq.read_table(p, columns=["key", "image"]) for p in sorted(out.glob("*.parquet"))]
    return sorted((r["key"], r["image"]) for t in tables for r in t.to_pylist())


def folder_now(folder: Path) -> list[tuple[str, str]]:
    """What the output must hold: each image of the folder once, with its current contents."""
    return sorted((p.relative_to(folder).as_posix(), _digest(p.read_bytes())) for p in folder.rglob("*.png"))


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "in"
    root.mkdir()
    for i in range(5):
        (root / f"img{i}.png").write_bytes(b"png %d" % i)
    return root


def test_images_added_before_between_and_after_are_picked_up_and_nothing_is_redone(folder, tmp_path):
    out = tmp_path / "out"
    run(folder, out, 2)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    for name in ["a.png", "img1b.png", "img9.png", "sub/z.png"]:
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(name.encode())
    plan, written = run(folder, out, 2)
    assert output_rows(out) == folder_now(folder)
    assert plan.superseded == {} and len(written) == 2  # the 4 new images, in shards of 2
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet") if p.name in stamps} == stamps
    assert run(folder, out, 2)[1] == set()  # and a third run has nothing to do


def test_a_removed_image_supersedes_its_shard_and_its_row_goes(folder, tmp_path):
    out = tmp_path / "out"
    first, _ = run(folder, out, 2)
    (folder / "img1.png").unlink()
    plan, written = run(folder, out, 2)
    assert output_rows(out) == folder_now(folder)
    (old,) = plan.superseded
    assert old == first.shards[0].shard_id and "img1.png" in plan.superseded[old]
    assert (out / SUPERSEDED / f"{old}.parquet").exists()  # set aside, not deleted
    assert len(written) == 1  # img0 again, alone


@pytest.mark.parametrize("change", ["replaced", "sidecar added", "touched"])
def test_a_changed_image_or_sidecar_redoes_its_shard_from_the_new_contents(folder, tmp_path, change):
    out = tmp_path / "out"
    first, _ = run(folder, out, 2)
    if change == "replaced":
        (folder / "img3.png").write_bytes(b"another image altogether")
    elif change == "sidecar added":
        (folder / "img3.txt").write_text("a caption")
    else:  # same bytes, newer modification time: the listing cannot tell it from an edit
        stat = (folder / "img3.png").stat()
        os.utime(folder / "img3.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    plan, written = run(folder, out, 2)
    assert output_rows(out) == folder_now(folder)
    assert list(plan.superseded) == [first.shards[1].shard_id]
    assert "replaced or edited" in plan.superseded[first.shards[1].shard_id]
    assert len(written) == 1


@pytest.mark.parametrize("before,after", [(2, 3), (3, 2), (2, 1000), (1000, 2)])
def test_changing_files_per_shard_neither_duplicates_nor_skips_an_image(folder, tmp_path, before, after):
    out = tmp_path / "out"
    run(folder, out, before)
    (folder / "img5.png").write_bytes(b"new")
    plan, written = run(folder, out, after)
    assert output_rows(out) == folder_now(folder)
    assert plan.superseded == {}  # the shards cut by the old setting still hold what the folder holds
    assert len(written) == 1  # only the new image is decoded


def test_a_run_cut_short_then_resumed_with_other_settings_writes_each_image_once(folder, tmp_path):
    out = tmp_path / "out"
    plan, _ = run(folder, out, 2)
    (out / f"{plan.shards[1].shard_id}.parquet").unlink()  # that shard was never written
    (folder / "img0.png").write_bytes(b"changed")
    plan, written = run(folder, out, 4)
    assert output_rows(out) == folder_now(folder)
    assert len(plan.superseded) == 1 and len(written) == 1  # img0 .. img3 together; img4's shard kept


def test_overlapping_finished_shards_keep_one_row_per_image(folder, tmp_path):
    """Two finished shards holding one image (output copied together from two runs): the later one is superseded."""
    out = tmp_path / "out"
    run(folder, out, 2)
    other = tmp_path / "other"
    run(folder, other, 3)
    for path in other.glob("*.parquet"):
        path.rename(out / path.name)
    plan, _ = run(folder, out, 2)
    assert output_rows(out) == folder_now(folder)
    assert plan.superseded and all("another finished shard" in why for why in plan.superseded.values())


def test_rows_per_prompt_are_read_back_as_their_images(folder, tmp_path):
    out = tmp_path / "out"
    run(folder, out, 2, prompts=("short", "long"))
    plan, written = run(folder, out, 3, prompts=("short", "long"))
    assert plan.superseded == {} and written == set()


def test_the_plan_lists_skipped_files_and_superseded_shards_for_the_log_and_manifest(folder, tmp_path):
    out = tmp_path / "out"
    (folder / "Thumbs.db").write_bytes(b"\0")
    (folder / "notes.txt").write_text("to do")
    (folder / ".DS_Store").write_bytes(b"\0")
    first, _ = run(folder, out, 2)
    (folder / "img4.png").unlink()
    plan, _ = run(folder, out, 2)
    manifest = plan.manifest()
    assert manifest["skipped_files"] == {"count": 3, "files": [".DS_Store", "Thumbs.db", "notes.txt"]}
    assert manifest["shard_identities"] == {s.shard_id: s.identity for s in plan.shards}
    assert list(manifest["shards_superseded_this_run"]) == [first.shards[2].shard_id]
    lines = plan.report(str(out))
    assert lines[0].startswith("3 files skipped as not images (.DS_Store, Thumbs.db, notes.txt;")
    assert lines[1].startswith("1 shards written by an earlier run no longer match the folder")
    assert lines[2] == f"  {first.shards[2].shard_id}: 1 of its 1 images are no longer in the folder (img4.png)"


def test_tar_and_parquet_inputs_plan_their_shards_as_listed(tmp_path):
    import tarfile

    (tmp_path / "in").mkdir()
    with tarfile.open(tmp_path / "in" / "000.tar", "w") as tar:
        tar.add(__file__, arcname="a.txt")
    listing = list_input(str(tmp_path / "in"))
    plan = plan_shards(listing, OutputDir(str(tmp_path / "out"), {}), CONFIG_HASH, 2, prompt_rows=False)
    assert plan.shards == listing.shards and plan.superseded == {}
