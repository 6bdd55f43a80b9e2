"""list_shards / read_shard for image folders, WebDataset tars and Parquet, on local disk and on S3 (moto)."""

from __future__ import annotations

import dataclasses
import io
import json
import posixpath
import random
import re
import tarfile
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.core import url_to_fs
from PIL import Image

from specvlm.data.retry import RetryPolicy
from specvlm.data.sources import Shard, ShardError, SourceError, list_input, list_shards, read_shard


@dataclass
class Store:
    """An empty folder on one backend, and how a user's config reaches it."""

    root: str
    storage_options: dict

    def uri(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def put(self, rel: str, data: bytes) -> None:
        fs, path = url_to_fs(self.uri(rel), **self.storage_options)
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        fs.pipe_file(path, data)

    def rm(self, rel: str) -> None:
        fs, path = url_to_fs(self.uri(rel), **self.storage_options)
        fs.rm(path)

    def list(self, rel: str, format: str = "auto", **kwargs) -> list[Shard]:
        return list_shards(self.uri(rel), format, storage_options=self.storage_options, **kwargs)

    def read(self, shard: Shard, **kwargs) -> list[dict]:
        return list(read_shard(shard, storage_options=self.storage_options, **kwargs))

    def read_until_failure(self, shard: Shard, **kwargs) -> tuple[list[dict], ShardError]:
        """The records a shard yields before it fails, and the failure (the test fails if it does not)."""
        records = []
        with pytest.raises(ShardError) as failure:
            for record in read_shard(shard, storage_options=self.storage_options, **kwargs):
                records.append(record)
        return records, failure.value


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return Store(str(tmp_path / "store"), {})
    bucket, storage_options = request.getfixturevalue("s3_bucket")
    return Store(f"s3://{bucket}/data", storage_options)


def _image(colour: str, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buffer, format)
    return buffer.getvalue()


RED, GREEN, BLUE = _image("red"), _image("green"), _image("blue", "JPEG")


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _parquet(table: pa.Table, row_group_size: int = 2) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=row_group_size)
    return buffer.getvalue()


def _named(shard: Shard) -> Shard:
    """The shard without its identity (a digest of its files' sizes and versions, checked apart)."""
    assert re.fullmatch("[0-9a-f]{16}", shard.identity), shard
    return dataclasses.replace(shard, identity="")


def _record(shard: Shard, key: str, **fields) -> dict:
    empty = dict.fromkeys(["image", "caption", "question", "choices", "answer", "references", "meta", "error"])
    return {"key": key, "shard_id": shard.shard_id, "source": shard.uri, **empty, **fields}


# ---------------------------------------------------------------- image folders


def test_image_folder_records_with_sidecars_and_clutter_skipped_and_named(store):
    vqa = json.dumps({"question": "What colour?", "choices": ["red", "green"], "answer": "green", "id": 7})
    for rel, data in [
        ("imgs/a/cat.png", RED),
        ("imgs/a/cat.txt", b"a red square\n"),
        ("imgs/dog.JPG", BLUE),
        ("imgs/dog.json", vqa.encode()),
        ("imgs/fish.png", GREEN),
        ("imgs/notes.txt", b"not a caption: no image called notes"),
        ("imgs/README.md", b"# readme"),
        ("imgs/Thumbs.db", b"windows thumbnails"),
        ("imgs/.DS_Store", b"finder"),
        ("imgs/._fish.png", b"macOS resource fork"),
        ("imgs/.ipynb_checkpoints/fish-checkpoint.png", GREEN),
    ]:
        store.put(rel, data)

    listing = list_input(store.uri("imgs"), storage_options=store.storage_options)
    (shard,) = listing.shards
    # The images first, then their sidecars; the shard is named by what it holds.
    files = ["a/cat.png", "dog.JPG", "fish.png", "a/cat.txt", "dog.json"]
    assert shard.files == tuple(store.uri(f"imgs/{f}") for f in files)
    assert shard.uri == store.uri("imgs") and shard.shard_id == f"images-{shard.identity}" and shard.identity
    assert listing.skipped == (
        ".DS_Store",
        "._fish.png",
        ".ipynb_checkpoints/fish-checkpoint.png",
        "README.md",
        "Thumbs.db",
        "notes.txt",
    )
    records = store.read(shard)

    def image(rel: str, **fields) -> dict:
        return {**_record(shard, rel, **fields), "source": store.uri(f"imgs/{rel}")}

    assert records == [
        image("a/cat.png", image=RED, caption="a red square"),
        image("dog.JPG", image=BLUE, question="What colour?", choices=["red", "green"], answer="green", meta=vqa),
        image("fish.png", image=GREEN),
    ]


def test_image_folder_chunks_in_sorted_order_with_ids_from_contents(tmp_path):
    store = Store(str(tmp_path), {})
    for name in ["e.png", "c.png", "a.png", "d/b.png", "b.png"]:
        store.put(f"imgs/{name}", RED)
    shards = store.list("imgs", files_per_shard=2)
    assert [[posixpath.relpath(f, store.uri("imgs")) for f in s.files] for s in shards] == [
        ["a.png", "b.png"],
        ["c.png", "d/b.png"],
        ["e.png"],
    ]
    assert len({s.shard_id for s in shards}) == 3 and all(s.shard_id.startswith("images-") for s in shards)
    assert store.list("imgs", files_per_shard=2) == shards
    assert [r["key"] for r in store.read(shards[1])] == ["c.png", "d/b.png"]
    # A replaced file renames its shard, and only its shard.
    store.put("imgs/c.png", GREEN + b"x")
    again = store.list("imgs", files_per_shard=2)
    assert [s.shard_id == t.shard_id for s, t in zip(shards, again)] == [True, False, True]


def test_image_folder_two_images_of_one_stem_are_two_rows_and_a_vanished_file_an_error(tmp_path):
    store = Store(str(tmp_path), {})
    for name, data in [("a.png", RED), ("b.png", GREEN), ("b.jpg", BLUE), ("b.txt", b"shared"), ("c.png", RED)]:
        store.put(f"imgs/{name}", data)
    (shard,) = store.list("imgs")
    store.rm("imgs/c.png")
    records = store.read(shard)
    assert [(r["key"], r["image"], r["caption"]) for r in records] == [
        ("a.png", RED, None),
        ("b.jpg", BLUE, "shared"),
        ("b.png", GREEN, "shared"),
        ("c.png", None, None),
    ]
    assert records[3]["error"].startswith("read_failed:") and "FileNotFoundError" in records[3]["error"]


def test_image_folder_of_img2dataset_files_layout_is_read_as_images(tmp_path):
    # img2dataset's output_format="files": 00000/000000001.jpg + .txt + .json, and 00000.parquet and
    # 00000_stats.json beside the folder.
    store = Store(str(tmp_path), {})
    for name, data in [
        ("00000/000000000.jpg", BLUE),
        ("00000/000000000.txt", b"blue"),
        ("00000/000000000.json", b'{"url": "http://x/0.jpg"}'),
        ("00000/000000001.png", RED),
        ("00000.parquet", _parquet(pa.table({"key": ["000000000", "000000001"], "status": ["success"] * 2}))),
        ("00000_stats.json", b'{"count": 2}'),
    ]:
        store.put(f"out/{name}", data)
    listing = list_input(store.uri("out"))
    assert listing.skipped == ("00000.parquet", "00000_stats.json")
    (shard,) = listing.shards
    assert shard.format == "images"
    records = store.read(shard)
    assert [(r["key"], r["image"], r["caption"], r["error"]) for r in records] == [
        ("00000/000000000.jpg", BLUE, "blue", None),
        ("00000/000000001.png", RED, None, None),
    ]


def test_image_folder_of_img2dataset_files_layout_with_format_images_has_no_error_rows(tmp_path):
    store = Store(str(tmp_path), {})
    for name, data in [("00000/000000000.jpg", BLUE), ("00000.parquet", _parquet(pa.table({"key": ["0"]})))]:
        store.put(f"out/{name}", data)
    store.put("out/00000_stats.json", b'{"count": 1}')
    listing = list_input(store.uri("out"), "images")
    assert listing.skipped == ("00000.parquet", "00000_stats.json")
    assert [(r["key"], r["error"]) for r in store.read(listing.shards[0])] == [("00000/000000000.jpg", None)]


def test_empty_image_bytes_are_one_kind_of_error_from_every_layout(tmp_path):
    """An empty file, tar member or Parquet value reaches the decoder as empty bytes, which it refuses as
    image_unreadable; a Parquet row with no value at all is image_missing."""
    from specvlm.data.images import ImageError, decode_image

    store = Store(str(tmp_path), {})
    store.put("folder/a.png", b"")
    store.put("tars/000.tar", _tar([("a.png", b"")]))
    store.put("tables/000.parquet", _parquet(pa.table({"key": ["a", "b"], "image": [b"", None]})))
    empty = [store.read(store.list(layout)[0])[0] for layout in ("folder", "tars", "tables")]
    assert [(r["image"], r["error"]) for r in empty] == [(b"", None)] * 3
    with pytest.raises(ImageError) as refused:
        decode_image(b"")
    assert refused.value.kind == "image_unreadable"
    (missing,) = store.read(store.list("tables")[0])[1:]
    assert missing["error"].startswith("image_missing: row 1 has no image")


# ---------------------------------------------------------------- webdataset


def test_webdataset_records(store):
    meta0 = json.dumps({"caption": "ignored: the .txt wins", "url": "http://x/0.jpg"})
    meta1 = json.dumps({"caption": "green", "question": "Colour?", "choices": ["green", "red"], "answer": 0})
    store.put(
        "wds/000.tar",
        _tar(
            [
                ("000.jpg", BLUE),
                ("000.txt", b"a blue square"),
                ("000.json", meta0.encode()),
                ("001.png", GREEN),
                ("001.json", meta1.encode()),
                ("002.txt", b"caption without an image"),
                ("sub/003.webp", RED),
                ("sub/003.seg.png", GREEN),
                ("sub/003.cls", b"3"),
                ("004.jpg", RED),
                ("004.json", b"{not json"),
            ]
        ),
    )
    (shard,) = store.list("wds")
    assert _named(shard) == Shard(uri=store.uri("wds/000.tar"), format="webdataset", shard_id="000")
    records = store.read(shard)
    bad_json = records[4].pop("error")
    assert records == [
        _record(shard, "000", image=BLUE, caption="a blue square", meta=meta0),
        _record(
            shard,
            "001",
            image=GREEN,
            caption="green",
            question="Colour?",
            choices=["green", "red"],
            answer="0",
            meta=meta1,
        ),
        _record(shard, "002", error=f"image_missing: no image member for key '002' in {shard.uri}; expected one"),
        _record(shard, "sub/003", image=RED),
        {k: v for k, v in _record(shard, "004", image=RED, meta="{not json").items() if k != "error"},
    ]
    assert bad_json.startswith("record_invalid: bad .json sidecar of '004'")


def _truncated_tar(cut: str) -> bytes:
    payload = bytes(range(256)) * 8  # 2 KiB per member, so a cut can land inside one
    members = [(f"{i:03d}.{ext}", payload) for i in range(3) for ext in ("jpg", "txt")]
    data = _tar(members)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        third = tar.getmember("002.jpg")
    # "header": cut where sample 002's header starts; tarfile itself takes that for a normal end.
    return data[: third.offset_data + 100] if cut == "data" else data[: third.offset]


# A cut inside sample 002's data drops 002. A cut at its header looks like a clean end to tarfile;
# the missing end-of-archive marker shows it is not, and 001 is dropped too since it may lack members.
@pytest.mark.parametrize("cut, good", [("data", ["000", "001"]), ("header", ["000"])])
def test_truncated_tar_yields_good_records_then_fails_saying_how_far_it_got(store, cut, good):
    store.put("wds/000.tar", _truncated_tar(cut))
    (shard,) = store.list("wds")
    records, failure = store.read_until_failure(shard)
    assert [r["key"] for r in records] == good  # no record stands in for the samples lost
    assert all(r["image"] and r["error"] is None for r in records)
    assert failure.read == len(good) and shard.uri in str(failure) and f"after {len(good)} records" in str(failure)


# ---------------------------------------------------------------- parquet


def test_parquet_records(store):
    table = pa.table(
        {
            "key": ["k0", "k1", "k2"],
            "image": pa.array([RED, GREEN, None], pa.binary()),
            "caption": ["red", None, "nothing"],
            "question": [None, "Which?", None],
            "choices": pa.array([None, ["a", "b"], None], pa.list_(pa.string())),
            "answer": [None, "b", None],
            "width": [4, 4, None],
            "url": ["u0", "u1", "u2"],
        }
    )
    store.put("pq/part-0.parquet", _parquet(table))
    (shard,) = store.list("pq")
    assert _named(shard) == Shard(uri=store.uri("pq/part-0.parquet"), format="parquet", shard_id="part-0")
    assert store.read(shard) == [
        _record(shard, "k0", image=RED, caption="red", meta='{"url": "u0", "width": 4}'),
        _record(
            shard,
            "k1",
            image=GREEN,
            question="Which?",
            choices=["a", "b"],
            answer="b",
            meta='{"url": "u1", "width": 4}',
        ),
        _record(
            shard,
            "k2",
            caption="nothing",
            meta='{"url": "u2", "width": null}',
            error="image_missing: row 2 has no image in column 'image'",
        ),
    ]


def test_parquet_hugging_face_struct_image_column_and_id_keys(store):
    images = pa.array(
        [{"bytes": RED, "path": "r.png"}, {"bytes": GREEN, "path": None}, {"bytes": None, "path": "pics/a.jpg"}],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    table = pa.table({"id": ["q7", "q8", "q9"], "img": images, "label": [1, 2, 3]})
    store.put("hf/train-00000-of-00001.parquet", _parquet(table))
    store.put("hf/pics/a.jpg", BLUE)  # a path is relative to the Parquet file's folder
    (shard,) = store.list("hf", "parquet")
    assert shard.shard_id == "train-00000-of-00001"
    assert store.read(shard, image_column="img") == [
        _record(shard, "q7", image=RED, meta='{"label": 1}'),
        _record(shard, "q8", image=GREEN, meta='{"label": 2}'),
        _record(shard, "q9", image=BLUE, meta='{"label": 3}'),
    ]


def test_parquet_column_of_paths_reads_them_and_names_a_missing_one(tmp_path):
    store = Store(str(tmp_path), {})
    store.put("pq/a.parquet", _parquet(pa.table({"image": ["x/red.png", "gone.png", str(tmp_path / "blue.jpg")]})))
    store.put("pq/x/red.png", RED)
    store.put("blue.jpg", BLUE)
    (shard,) = store.list("pq", "parquet")
    records = store.read(shard)
    assert [(r["key"], r["image"]) for r in records] == [("00000000", RED), ("00000001", None), ("00000002", BLUE)]
    assert records[1]["error"].startswith("read_failed: cannot read image " + store.uri("pq/gone.png"))
    assert "check the paths in column 'image'" in records[1]["error"]


def test_parquet_without_the_image_column_names_the_setting_and_the_columns(tmp_path):
    store = Store(str(tmp_path), {})
    store.put("pq/a.parquet", _parquet(pa.table({"picture": [RED], "caption": ["red"]})))
    (shard,) = store.list("pq")
    records, failure = store.read_until_failure(shard)
    assert records == [] and failure.read == 0
    assert "no image column 'image'; its columns are picture, caption" in str(failure)
    assert "input.image_column" in str(failure)


def test_parquet_image_column_that_holds_no_images_is_refused(tmp_path):
    store = Store(str(tmp_path), {})
    store.put("pq/a.parquet", _parquet(pa.table({"image": [1, 2]})))
    (shard,) = store.list("pq")
    _, failure = store.read_until_failure(shard)
    assert "column 'image'" in str(failure) and "holds int64, not images" in str(failure)


def test_duplicate_keys_become_error_records(tmp_path):
    store = Store(str(tmp_path), {})
    store.put("pq/a.parquet", _parquet(pa.table({"key": ["x", "y", "x", "x"], "image": [RED, GREEN, BLUE, RED]})))
    (shard,) = store.list("pq")
    records = store.read(shard)
    assert [r["key"] for r in records] == ["x", "y", "x:__duplicate1__", "x:__duplicate2__"]
    assert [r["image"] for r in records] == [RED, GREEN, None, None]
    assert "occurs more than once" in records[2]["error"]


# ---------------------------------------------------------------- listing and unreadable shards


def test_glob_listing_gives_sorted_unique_stable_ids(store):
    for rel in ["shards/001.tar", "shards/000.tar", "shards/sub/000.tar", "shards/000.parquet", "shards/x.txt"]:
        store.put(rel, b"")
    top = store.list("shards/*.tar")
    assert [(s.shard_id, s.uri) for s in top] == [
        ("000", store.uri("shards/000.tar")),
        ("001", store.uri("shards/001.tar")),
    ]
    deep = store.list("shards/**/*.tar")
    assert [s.shard_id for s in deep] == ["000", "001", "sub__000"]
    assert store.list("shards") == deep  # a directory: tars win over img2dataset-style metadata parquet
    assert [s.shard_id for s in store.list("shards", "parquet")] == ["000"]
    (single,) = store.list("shards/sub/000.tar")
    assert _named(single) == Shard(uri=store.uri("shards/sub/000.tar"), format="webdataset", shard_id="000")


def test_ids_stay_unique_when_sanitised_names_collide(tmp_path):
    store = Store(str(tmp_path), {})
    for rel in ["s/a b.parquet", "s/a_b.parquet", "s/c:d.parquet"]:
        store.put(rel, b"")
    ids = [s.shard_id for s in store.list("s")]
    assert len(set(ids)) == 3
    assert ids[0].startswith("a_b-") and ids[1].startswith("a_b-") and ids[2] == "c_d"


def test_missing_and_invalid_shards_fail_without_records(store):
    store.put("mix/000.tar", _tar([("a.jpg", RED)]))
    store.put("mix/001.tar", _tar([("b.jpg", GREEN), ("b.txt", b"green")]))
    store.put("mix/002.tar", b"this is not a tar file" * 100)
    store.put("other/bad.parquet", b"PAR1 not really parquet")
    shards = store.list("mix")
    store.rm("mix/000.tar")  # deleted between listing and reading
    shards += store.list("other")
    assert store.read(shards[1]) == [_record(shards[1], "b", image=GREEN, caption="green")]
    failures = {}
    for shard in shards[:1] + shards[2:]:
        records, failures[shard.shard_id] = store.read_until_failure(shard, retry=RetryPolicy(budget_s=0))
        assert records == [] and shard.uri in str(failures[shard.shard_id])
    assert "FileNotFoundError" in str(failures["000"])


@pytest.mark.parametrize("rel", ["nothing/*.tar", "missing-folder", "missing.tar", "docs"])
def test_uri_matching_nothing_raises_source_error_naming_it(store, rel):
    store.put("docs/README.md", b"# no data here")
    with pytest.raises(SourceError, match=re.escape(store.uri(rel))):
        store.list(rel)


# ---------------------------------------------------------------- object-storage faults (moto behind FaultProxy)


def _noise_png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", (32, 32), random.Random(seed).randbytes(32 * 32 * 3)).save(buffer, "PNG")
    return buffer.getvalue()  # about 3 KiB: noise does not compress


def _layouts(store: Store) -> list[Shard]:
    """One shard of each layout, about 20 KiB each, on `store`."""
    images = [_noise_png(seed) for seed in range(6)]
    store.put(
        "wds/000.tar",
        _tar([(f"{i:03d}.{ext}", d) for i, img in enumerate(images) for ext, d in [("png", img), ("txt", b"c")]]),
    )
    store.put("pq/part.parquet", _parquet(pa.table({"key": [f"k{i}" for i in range(6)], "image": images})))
    for i, img in enumerate(images):
        store.put(f"imgs/{i}.png", img)
    return [*store.list("wds"), *store.list("pq"), *store.list("imgs")]


def test_shard_streams_through_random_faults_yield_every_record_once(s3_bucket, fault_proxy):
    bucket, options = s3_bucket
    shards = _layouts(Store(f"s3://{bucket}/data", options))
    clean = [Store(f"s3://{bucket}/data", options).read(s) for s in shards]
    # Small blocks: a tar is fetched in many range requests, so faults strike in the middle of the stream.
    faulty = Store(f"s3://{bucket}/data", {**options, "endpoint_url": fault_proxy.url, "default_block_size": 2048})
    fault_proxy.fault_rate = 0.25
    fault_proxy.delay_s = 0.05
    assert [faulty.read(s) for s in shards] == clean
    assert fault_proxy.injected["reset"] and fault_proxy.injected["cut"], fault_proxy.injected


def test_short_outage_of_one_object_is_absorbed(s3_bucket, fault_proxy):
    bucket, options = s3_bucket
    store = Store(f"s3://{bucket}/data", options)
    (shard,) = _layouts(store)[:1]
    fault_proxy.outage(f"{bucket}/data/wds/000.tar", requests=15)
    through_proxy = Store(store.root, {**options, "endpoint_url": fault_proxy.url})
    assert through_proxy.read(shard) == store.read(shard)
    assert fault_proxy.injected["outage"] == 15


def test_outage_outlasting_the_retry_budget_fails_the_shard(s3_bucket, fault_proxy):
    bucket, options = s3_bucket
    store = Store(f"s3://{bucket}/data", options)
    (shard,) = _layouts(store)[:1]
    fault_proxy.outage(f"{bucket}/data/wds/000.tar")
    through_proxy = Store(store.root, {**options, "endpoint_url": fault_proxy.url})
    records, failure = through_proxy.read_until_failure(shard, retry=RetryPolicy(budget_s=1))
    assert records == [] and "Service Unavailable" in str(failure) and fault_proxy.injected["outage"] >= 3
