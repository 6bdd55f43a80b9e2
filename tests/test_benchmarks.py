"""Benchmark layouts as inputs (specvlm/data/benchmarks.py): each layout's reader on tiny files, on local disk and
S3, and a ScienceQA-style benchmark with text-only problems through the whole job."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.job import run_job
from pipeline.stages import Preparer
from specvlm.data.images import decode_image
from specvlm.data.sources import SourceError, list_shards, read_shard
from specvlm.demo.benchmark import SEED, START, write_demo_benchmark
from specvlm.demo.world import make_scene
from specvlm.evaluation.answers import normalize_answer, vqa_accuracy
from specvlm.specdec.requests import Request
from tests.test_pipeline import config_for, read_output
from tests.test_sources import Store


def _png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buffer, "PNG")
    return buffer.getvalue()


RED, GREEN, BLUE = _png("red"), _png("green"), _png("blue")


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return Store(str(tmp_path / "store"), {})
    bucket, storage_options = request.getfixturevalue("s3_bucket")
    return Store(f"s3://{bucket}/bench", storage_options)


def test_coco_captions_one_sample_per_image_with_every_caption(store):
    store.put("val/a.jpg", RED)
    store.put("val/b.jpg", GREEN)
    coco = {
        "images": [{"id": 7, "file_name": "a.jpg", "height": 4}, {"id": 9, "file_name": "b.jpg", "height": 4}],
        "annotations": [
            {"id": 3, "image_id": 7, "caption": "A red square. "},
            {"id": 1, "image_id": 9, "caption": "green"},
            {"id": 2, "image_id": 7, "caption": "a red box"},
        ],
    }
    store.put("annotations/captions_val.json", json.dumps(coco).encode())
    (shard,) = store.list("annotations/captions_val.json", "coco", images=store.uri("val"))
    assert (shard.shard_id, shard.files, shard.images) == ("captions_val-00000", ("7", "9"), store.uri("val"))
    first, second = store.read(shard)
    assert (first["key"], first["image"], first["error"]) == ("7", RED, None)
    # Annotations in id order: the first caption is the reference, every caption counts.
    assert first["caption"] == "a red box" and first["references"] == ["a red box", "A red square."]
    assert json.loads(first["meta"]) == {"image_id": 7, "height": 4}
    assert (second["image"], second["references"]) == (GREEN, ["green"])


def test_vqav2_questions_with_ten_answers_from_the_annotations_named_like_them(tmp_path):
    store = Store(str(tmp_path), {})
    store.put("images/COCO_val2014_000000000042.jpg", BLUE)
    questions = {"data_subtype": "val2014", "questions": [{"question_id": 420, "image_id": 42, "question": "Colour?"}]}
    answers = [{"answer": a, "answer_id": i} for i, a in enumerate(["blue"] * 8 + ["navy", "Blue"])]
    annotations = {
        "annotations": [
            {
                "question_id": 420,
                "image_id": 42,
                "question_type": "what color",
                "answer_type": "other",
                "multiple_choice_answer": "blue",
                "answers": answers,
            }
        ]
    }
    store.put("ann/v2_OpenEnded_mscoco_val2014_questions.json", json.dumps(questions).encode())
    store.put("ann/v2_mscoco_val2014_annotations.json", json.dumps(annotations).encode())
    (shard,) = store.list("ann/v2_OpenEnded_mscoco_val2014_questions.json", "vqav2", images=store.uri("images"))
    (record,) = store.read(shard)
    assert (record["key"], record["image"], record["question"], record["answer"]) == ("420", BLUE, "Colour?", "blue")
    assert record["references"] == ["blue"] * 8 + ["navy", "Blue"]
    assert json.loads(record["meta"]) == {"image_id": 42, "question_type": "what color", "answer_type": "other"}

    # A test split has no answers file: questions only, nothing to score against.
    store.rm("ann/v2_mscoco_val2014_annotations.json")
    (shard,) = store.list("ann/v2_OpenEnded_mscoco_val2014_questions.json", "vqav2", images=store.uri("images"))
    (record,) = store.read(shard)
    assert record["question"] == "Colour?" and record["answer"] is None and record["references"] is None


def test_scienceqa_split_letters_and_text_only_problems(tmp_path):
    store = Store(str(tmp_path), {})
    store.put("sqa/images/test/1/image.png", RED)
    problems = {
        "1": {"question": "Which colour?", "choices": ["red", "blue"], "answer": 0, "hint": "", "image": "image.png",
              "split": "test", "subject": "natural science", "grade": "grade2"},
        "2": {"question": "Which is a fruit?", "choices": ["rock", "pear", "car"], "answer": 1,
              "hint": "Fruits grow on plants.", "image": None, "split": "test", "subject": "language science"},
        "3": {"question": "Ignored?", "choices": ["x", "y"], "answer": 1, "image": None, "split": "train"},
    }  # fmt: skip
    store.put("sqa/problems.json", json.dumps(problems).encode())
    (shard,) = store.list("sqa/problems.json", "scienceqa", split="test")
    image_row, text_row = store.read(shard)
    assert (image_row["key"], image_row["image"], image_row["answer"]) == ("1", RED, "a")
    assert image_row["choices"] == ["red", "blue"] and image_row["question"] == "Which colour?"
    assert json.loads(image_row["meta"]) == {"subject": "natural science", "grade": "grade2", "split": "test",
                                             "has_image": True}  # fmt: skip
    # No image and no error: the pipeline makes it a text-only prompt, with the hint as its context.
    assert text_row["image"] is None and text_row["error"] is None and text_row["answer"] == "b"
    assert text_row["question"] == "Context: Fruits grow on plants.\nWhich is a fruit?"
    assert [s.files for s in store.list("sqa/problems.json", "scienceqa")] == [("1", "2", "3")]


def test_jsonl_paths_uris_answer_lists_and_a_bad_line(tmp_path):
    store = Store(str(tmp_path), {})
    store.put("data/imgs/a.png", RED)
    store.put("elsewhere/b.png", GREEN)
    lines = [
        json.dumps({"image": "imgs/a.png", "question": "what?", "answer": "red", "source": "x"}),
        json.dumps(
            {"id": "q2", "image": store.uri("elsewhere/b.png"), "question": "how?", "answer": ["2", "two", "2"]}
        ),
        "{not json",
        json.dumps({"image": "imgs/missing.png", "question": "where?", "answer": "here"}),
    ]
    store.put("data/qa.jsonl", ("\n".join(lines) + "\n").encode())
    shards = store.list("data/qa.jsonl", "jsonl", files_per_shard=2)
    assert [(s.shard_id, s.files) for s in shards] == [("qa-00000", ("0", "q2")), ("qa-00001", ("line3", "3"))]
    first, second = store.read(shards[0])
    assert (first["image"], first["answer"], first["references"], json.loads(first["meta"])) == (
        RED,
        "red",
        None,
        {"source": "x"},
    )
    # A list answer: every entry a reference, the most common one the answer.
    assert (second["key"], second["image"], second["answer"]) == ("q2", GREEN, "2")
    assert second["references"] == ["2", "two", "2"]
    bad, missing = store.read(shards[1])
    assert bad["image"] is None and "line 3" in bad["error"] and "not a JSON object" in bad["error"]
    assert missing["image"] is None and "cannot read image" in missing["error"] and "input.images" in missing["error"]


def _hf_rows():
    return {
        "image": [Image.open(io.BytesIO(RED)), Image.open(io.BytesIO(GREEN)), None],
        "question": ["q0", "q1", "q2"],
        "answers": [[{"answer": "a", "answer_id": 1}], [{"answer": "b", "answer_id": 1}], []],
        "topic": ["t0", "t1", "t2"],
    }


def test_hugging_face_dataset_saved_to_disk_and_as_parquet(tmp_path):
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answers": [{"answer": datasets.Value("string"), "answer_id": datasets.Value("int64")}],
            "topic": datasets.Value("string"),
        }
    )
    dataset = datasets.Dataset.from_dict(_hf_rows(), features=features)
    datasets.DatasetDict({"validation": dataset, "test": dataset}).save_to_disk(str(tmp_path / "saved"))
    dataset.to_parquet(str(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet"))
    dataset.to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))

    with pytest.raises(SourceError, match=r"input\.split"):
        list_shards(str(tmp_path / "saved"), "hf")
    for uri in (tmp_path / "saved", tmp_path / "hub"):
        (shard,) = list_shards(str(uri), "hf", split="test")
        records = list(read_shard(shard))
        assert [r["key"] for r in records] == ["00000000", "00000001", "00000002"]
        assert [decode_image(r["image"]).getpixel((0, 0)) if r["image"] else None for r in records] == [
            (255, 0, 0),
            (0, 128, 0),
            None,
        ]
        assert records[0]["question"] == "q0" and records[2]["image"] is None and records[2]["error"] is None
        # Fields the task does not know stay metadata; input.fields can map `answers` to references.
        assert json.loads(records[1]["meta"]) == {"answers": [{"answer": "b", "answer_id": 1}], "topic": "t1"}


def test_hugging_face_image_stored_as_a_path_is_read_from_the_image_root(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "x.png").write_bytes(BLUE)
    # datasets itself would embed the file on writing: write what a dataset stored with paths looks like.
    features = datasets.Features({"picture": datasets.Image(), "caption": [datasets.Value("string")]})
    rows = [{"picture": {"bytes": None, "path": "x.png"}, "caption": ["a blue square", "blue"]}]
    (tmp_path / "ds").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=features.arrow_schema), tmp_path / "ds" / "data.parquet")
    (shard,) = list_shards(str(tmp_path / "ds"), "hf", images=str(tmp_path / "pics"))
    (record,) = read_shard(shard)
    assert record["image"] == BLUE and record["caption"] == "a blue square"
    assert record["references"] == ["a blue square", "blue"]


def test_layout_errors_say_what_to_fix(tmp_path):
    store = Store(str(tmp_path), {})
    store.put("a/captions.json", json.dumps({"images": [{"id": 1}], "annotations": []}).encode())
    with pytest.raises(SourceError, match="not in the coco layout"):
        store.list("a/captions.json", "coco")
    with pytest.raises(SourceError, match="is not a file"):
        store.list("a", "vqav2")
    with pytest.raises(SourceError, match="unknown format"):
        store.list("a/captions.json", "cocoo")
    # The annotations changed after listing: the shard's samples are gone, and the shard says so.
    store.put("b/captions.json", json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": []}).encode())
    (shard,) = store.list("b/captions.json", "coco")
    store.put("b/captions.json", json.dumps({"images": [{"id": 2, "file_name": "x.jpg"}], "annotations": []}).encode())
    records, failure = store.read_until_failure(shard)
    assert records == [] and "no longer in" in str(failure)


def test_scienceqa_benchmark_through_the_job_with_text_only_prompts(family, models, tmp_path, ray_local):
    """Image problems decode as the target's greedy output with the image, text-only ones as its greedy output of the
    prompt alone (no placeholder, no pixels), with the VLM draft; references and metadata reach the output."""
    store = Store(str(tmp_path), {})
    images = {"0": RED, "2": BLUE}  # problems 1 and 3 have none
    for pid, image in images.items():
        store.put(f"sqa/images/test/{pid}/image.png", image)
    problems = {
        str(pid): {"question": "a red circle", "choices": ["fox", "dog"], "answer": pid % 2,
                   "image": "image.png" if str(pid) in images else None, "split": "test", "topic": f"t{pid}"}
        for pid in range(4)
    }  # fmt: skip
    store.put("sqa/problems.json", json.dumps(problems).encode())
    overrides = ("input.format=scienceqa", "task.kind=mc")
    config = config_for(models, f"{tmp_path}/sqa/problems.json", f"{tmp_path}/out", *overrides)
    summary = run_job(config, log=lambda *_: None)
    assert (summary.rows, summary.errors) == (4, 0)
    (table,) = read_output(f"{tmp_path}/out").values()
    rows = table.to_pylist()
    assert [("<image>" in r["prompt"]) for r in rows] == [True, False, True, False]
    for row in rows:
        assert row["reference"] == "ab"[int(row["key"]) % 2] and json.loads(row["meta"])["topic"] == f"t{row['key']}"
        image = images.get(row["key"])
        pixels = {"images": decode_image(image)} if image else {}
        encoded = family.processor(text=row["prompt"], return_tensors="pt", **pixels)
        request = Request(encoded.input_ids[0].tolist(), encoded.get("pixel_values"))
        assert row["output_ids"] == family.reference(request, 10)


def test_layout_options_are_refused_for_shard_formats():
    with pytest.raises(ConfigError, match=r"input\.images applies to the benchmark layouts only"):
        load_config(None, ["input.uri=x", "input.images=y", "output.uri=o", "model.target=t"])
    config = load_config(
        None, ["input.uri=x", "input.format=vqav2", "input.annotations=a", "output.uri=o", "model.target=t"]
    )
    assert config.input.annotations == "a"


BUNDLED = Path(__file__).resolve().parents[1] / "assets" / "demo" / "benchmark"


def test_bundled_demo_benchmark_is_what_the_builder_writes(tmp_path):
    built = write_demo_benchmark(tmp_path / "built")
    files = sorted(p.relative_to(built) for p in built.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(BUNDLED) for p in BUNDLED.rglob("*") if p.is_file())
    for rel in files:
        ours, bundled = (built / rel).read_bytes(), (BUNDLED / rel).read_bytes()
        if rel.suffix in (".jpg", ".png"):  # encoders may differ in a byte; the pixels may not, beyond JPEG's noise
            a, b = (np.asarray(decode_image(data), dtype=int) for data in (ours, bundled))
            assert np.abs(a - b).max() <= 2, rel
        elif rel.suffix == ".parquet":
            a, b = pq.read_table(built / rel), pq.read_table(BUNDLED / rel)
            assert a.drop_columns(["image"]).equals(b.drop_columns(["image"])) and a.schema.equals(b.schema)
        else:
            assert ours == bundled, rel


def test_demo_benchmark_references_are_true_to_their_scenes(tmp_path):
    root = write_demo_benchmark(tmp_path / "b", count=16)
    scenes = {START + i: make_scene(SEED, START + i) for i in range(16)}
    coco = json.loads((root / "annotations" / "captions_world1.json").read_text())
    captions = {}
    for annotation in coco["annotations"]:
        captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
    assert all(refs[0] == scenes[i].caption and len(set(refs)) == 5 for i, refs in captions.items())
    answers = json.loads((root / "annotations" / "v2_mscoco_world1_annotations.json").read_text())["annotations"]
    for a in answers:
        right = normalize_answer(scenes[a["image_id"]].answer)
        humans = [h["answer"] for h in a["answers"]]
        # Ten answers, most of them right in some wording: the world's own answer scores 1.0 against them.
        assert len(humans) == 10 and vqa_accuracy(scenes[a["image_id"]].answer, humans) == 1.0
        assert right.endswith(normalize_answer(a["multiple_choice_answer"]))  # "in center": "center" is right too
    problems = json.loads((root / "scienceqa" / "problems.json").read_text())
    text_only = [pid for pid, p in problems.items() if p["image"] is None]
    assert text_only == [str(START + 7), str(START + 15)]
    assert all(problems[pid]["hint"] == scenes[int(pid)].caption for pid in text_only)


def test_references_map_from_metadata_answer_dicts_as_hugging_face_vqa_stores_them(family):
    config = load_config(
        None, ["input.uri=x", "input.fields.references=answers", "task.kind=vqa", "output.uri=o", "model.target=t"]
    )
    meta = json.dumps({"answers": [{"answer": "red", "answer_id": 1}, {"answer": "Red", "answer_id": 2}]})
    record = {"key": "k", "shard_id": "s", "source": "u", "image": RED, "question": "colour?", "answer": "red",
              "caption": None, "choices": None, "references": None, "meta": meta, "error": None,
              "row_index": 0, "is_end": False}  # fmt: skip
    row = Preparer(config, family.processor)(record)
    assert row["error"] is None and row["references"] == ["red", "Red"] and row["meta"] == meta
