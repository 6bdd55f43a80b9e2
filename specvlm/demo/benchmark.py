"""A small held-out benchmark from the demo world, written in each layout `specvlm/data/benchmarks.py` reads.

The scenes are held out (world seed 1 from index 1000: the demo family trains on seed 0, the bundled shards are
seed 1 from index 0). Each layout gets what its real counterpart has, made from what the world knows exactly:

    images/COCO_world1_{id:012d}.jpg                     the scenes, shared by the COCO and VQAv2 layouts (as
                                                          COCO's val2014 folder is)
    annotations/captions_world1.json                      COCO captions: five references per image, the world's
                                                          caption and four rephrasings of it
    annotations/v2_OpenEnded_mscoco_world1_questions.json VQAv2 questions, and ten human-like answers each in
    annotations/v2_mscoco_world1_annotations.json         the annotations (some rephrased, some wrong)
    scienceqa/problems.json, scienceqa/images/...         ScienceQA-style multiple choice; every eighth problem
                                                          has no image and gives the scene's caption as context
    vqa.jsonl                                             {image, question, answer}: another question per scene
    hf/test-00000-of-00001.parquet                        a Hugging Face dataset (Image feature + a list of
                                                          captions), as the Hub stores one

Everything is a function of the arguments, so the bundled copy (assets/demo/benchmark) can be rebuilt and checked:
`python -m jobs.make_demo_benchmark`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from specvlm.demo import world
from specvlm.demo.shards import encode_image
from specvlm.demo.world import BACKGROUNDS, COLOURS, NUMBERS, POSITIONS, SHAPES, SIZES, Scene, caption, make_scene
from specvlm.demo.world_data import scene_questions

SEED, START, COUNT = 1, 1000, 64
SUBTYPE = "world1"  # VQAv2's data_subtype (val2014 there): it names the image files
NO_IMAGE_EVERY = 8  # ScienceQA: one problem in eight is text-only


def write_demo_benchmark(root: str | Path, *, seed: int = SEED, start: int = START, count: int = COUNT) -> Path:
    root = Path(root)
    scenes = [make_scene(seed, index) for index in range(start, start + count)]
    ids = list(range(start, start + count))
    (root / "images").mkdir(parents=True, exist_ok=True)
    for image_id, scene in zip(ids, scenes):
        (root / "images" / image_name(image_id)).write_bytes(encode_image(scene, "jpg"))
    _write_json(root / "annotations" / f"captions_{SUBTYPE}.json", _coco(scenes, ids))
    questions, answers = _vqav2(scenes, ids)
    _write_json(root / "annotations" / f"v2_OpenEnded_mscoco_{SUBTYPE}_questions.json", questions)
    _write_json(root / "annotations" / f"v2_mscoco_{SUBTYPE}_annotations.json", answers)
    _write_json(root / "scienceqa" / "problems.json", _scienceqa(scenes, ids, root / "scienceqa" / "images"))
    (root / "vqa.jsonl").write_text("".join(json.dumps(row) + "\n" for row in _jsonl(scenes, ids)))
    _write_hf(root / "hf" / "test-00000-of-00001.parquet", scenes, ids)
    return root


def image_name(image_id: int) -> str:
    return f"COCO_{SUBTYPE}_{image_id:012d}.jpg"


def caption_references(scene: Scene) -> list[str]:
    """The world's caption first, then four ways a person might put the same scene."""
    objects, background = scene.objects, scene.background
    looks = [f"a {o.size} {o.colour} {o.shape}" for o in objects]
    plain = [f"a {o.colour} {o.shape}" for o in objects]
    n = len(objects)
    reordered = caption(background, objects[::-1]) if n > 1 else f"a {background} background with {looks[0]}."
    return [
        scene.caption,
        reordered,
        f"{NUMBERS[n - 1]} shape{'s' if n > 1 else ''} on a {background} background: {world._join(looks)}.",
        f"a {background} image with {world._join(plain)}.",
        f"there {'is' if n == 1 else 'are'} {world._join(looks)} on the {background} background.",
    ]


def question_kind(question: str) -> str:
    """Which of the world's question kinds a question is (count, background, shape, colour, size, position)."""
    for prefix, kind in (
        ("how many", "count"),
        ("what is the background", "background"),
        ("what shape", "shape"),
        ("what colour", "colour"),
        ("what size", "size"),
        ("where", "position"),
    ):
        if question.startswith(prefix):
            return kind
    raise ValueError(f"not a question of the demo world: {question!r}")


_WRONG = {
    "count": NUMBERS,
    "background": tuple(BACKGROUNDS),
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": SIZES,
    "position": POSITIONS,
}


def human_answers(scene: Scene, question: str, answer: str) -> list[str]:
    """Ten answers as VQA's annotators give them: short, unpunctuated, mostly right in a few wordings, and in
    some scenes one to three wrong ones, so that VQA accuracy is more than right or wrong."""
    rng = random.Random(f"specvlm-vqa:{scene.key}:{question}")
    kind = question_kind(question)
    right = answer.rstrip(".")
    wordings = [right, right.removeprefix("a ").removeprefix("at the ").removeprefix("on the ").removeprefix("in the ")]
    if kind == "count":
        wordings.append(str(NUMBERS.index(right) + 1))
    wrong_count = rng.choice((0, 0, 0, 1, 1, 2, 3))
    bare = wordings[1]
    wrong = [w for w in _WRONG[kind] if w != bare]
    answers = [rng.choice(wordings) for _ in range(10 - wrong_count)] + [rng.choice(wrong) for _ in range(wrong_count)]
    rng.shuffle(answers)
    return answers


def _coco(scenes: list[Scene], ids: list[int]) -> dict:
    images, annotations = [], []
    for image_id, scene in zip(ids, scenes):
        images.append(
            {
                "id": image_id,
                "file_name": image_name(image_id),
                "width": scene.image.width,
                "height": scene.image.height,
                "shapes": len(scene.objects),
                "background": scene.background,
            }
        )
        for text in caption_references(scene):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": text})
    return {
        "info": {"description": "specvlm demo world, held-out scenes"},
        "images": images,
        "annotations": annotations,
    }


def _vqav2(scenes: list[Scene], ids: list[int]) -> tuple[dict, dict]:
    questions, annotations = [], []
    for image_id, scene in zip(ids, scenes):
        question_id = image_id * 10
        questions.append({"image_id": image_id, "question": scene.question, "question_id": question_id})
        answers = human_answers(scene, scene.question, scene.answer)
        kind = question_kind(scene.question)
        annotations.append(
            {
                "question_id": question_id,
                "image_id": image_id,
                "question_type": " ".join(scene.question.split()[:2]),
                "answer_type": "number" if kind == "count" else "other",
                "multiple_choice_answer": max(answers, key=answers.count),
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)
                ],
            }
        )
    header = {"data_type": "mscoco", "data_subtype": SUBTYPE}
    return {**header, "task_type": "Open-Ended", "questions": questions}, {**header, "annotations": annotations}


def _scienceqa(scenes: list[Scene], ids: list[int], images: Path) -> dict:
    problems = {}
    for n, (image_id, scene) in enumerate(zip(ids, scenes)):
        pid, text_only = str(image_id), n % NO_IMAGE_EVERY == NO_IMAGE_EVERY - 1
        if not text_only:
            (images / "test" / pid).mkdir(parents=True, exist_ok=True)
            (images / "test" / pid / "image.png").write_bytes(encode_image(scene, "png"))
        kind = question_kind(scene.mc_question)
        problems[pid] = {
            "question": scene.mc_question,
            "choices": list(scene.choices),
            "answer": scene.answer_index,
            "hint": scene.caption if text_only else "",
            "image": None if text_only else "image.png",
            "task": "closed choice",
            "grade": "grade1",
            "subject": "world",
            "topic": kind,
            "category": kind,
            "skill": kind,
            "lecture": "",
            "solution": scene.reasoning,
            "split": "test",
        }
    return problems


def _jsonl(scenes: list[Scene], ids: list[int]) -> list[dict]:
    rows = []
    for image_id, scene in zip(ids, scenes):
        question, answer = scene_questions(scene, 2)[-1]  # another question than the VQAv2 layout's where it can
        rows.append(
            {
                "id": f"q{image_id}",
                "image": f"images/{image_name(image_id)}",
                "question": question,
                "answer": answer,
                "kind": question_kind(question),
            }
        )
    return rows


def _write_hf(path: Path, scenes: list[Scene], ids: list[int]) -> None:
    """Parquet as `datasets` writes it: the image a {bytes, path} struct, the features in the schema metadata."""
    features = {
        "image": {"_type": "Image"},
        "caption": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "List"},
        "image_id": {"dtype": "int64", "_type": "Value"},
        "background": {"dtype": "string", "_type": "Value"},
    }
    schema = pa.schema(
        [
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("caption", pa.list_(pa.string())),
            ("image_id", pa.int64()),
            ("background", pa.string()),
        ],
        metadata={"huggingface": json.dumps({"info": {"features": features}})},
    )
    rows = [
        {
            "image": {"bytes": encode_image(scene, "png"), "path": None},
            "caption": caption_references(scene),
            "image_id": image_id,
            "background": scene.background,
        }
        for image_id, scene in zip(ids, scenes)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _write_json(path: Path, document) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")  # indented: a reader can see the layout


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m jobs.make_demo_benchmark", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="assets/demo/benchmark", help="folder to write the layouts into")
    args = parser.parse_args(argv)
    print(f"written: {write_demo_benchmark(args.out)}")
    return 0
