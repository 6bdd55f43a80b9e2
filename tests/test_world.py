"""The procedural demo world: determinism, truthful text, clean geometry, and shards that round-trip.

Ground truth is recomputed here independently of world.py's text templates wherever possible.
"""

import io
import itertools
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from specvlm.data.prompts import format_choices
from specvlm.demo import world
from specvlm.demo.shards import write_parquet_shards, write_webdataset_shards

SIZE = 64
SCENES = [world.make_scene(7, i, SIZE) for i in range(400)]
NUMBER = {1: "one", 2: "two", 3: "three"}
# Independent of world._WHERE: how each grid cell is spoken of.
WHERE = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
PLACE = {phrase: position for position, phrase in WHERE.items()}


def texts(scene):
    return [scene.caption, scene.question, scene.answer, scene.mc_question, *scene.choices, scene.reasoning]


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_same_seed_and_index_give_identical_scene():
    for index in (0, 1, 123_456_789):
        a, b = world.make_scene(3, index), world.make_scene(3, index)
        assert png_bytes(a.image) == png_bytes(b.image)
        assert texts(a) == texts(b) and a.objects == b.objects and a.answer_index == b.answer_index
    assert world.make_scene(3, 5).key == "0003-0000005"


def test_other_index_or_seed_gives_other_scene():
    assert world.make_scene(0, 0).caption != world.make_scene(0, 1).caption
    assert world.make_scene(0, 0).caption != world.make_scene(1, 0).caption
    captions = {s.caption for s in SCENES}
    assert len(captions) > 0.95 * len(SCENES)
    assert {len(s.objects) for s in SCENES} == {1, 2, 3}
    assert {s.background for s in SCENES} == set(world.BACKGROUNDS)


def test_caption_names_every_object_once_in_reading_order():
    for scene in SCENES:
        boxes = [world.object_box(o, SIZE) for o in scene.objects]
        # Reading order from the pixels: rows top to bottom, then left to right.
        assert boxes == sorted(boxes, key=lambda b: (b[1] // (SIZE // 3), b[0]))
        offsets = []
        for obj in scene.objects:
            phrase = f"a {obj.size} {obj.colour} {obj.shape} {WHERE[obj.position]}"
            # Followed by a separator, so "at the top" does not also match "at the top left".
            [match] = re.finditer(re.escape(phrase) + r"(?=,| and | on a )", scene.caption)
            offsets.append(match.start())
        assert offsets == sorted(offsets)
        # Nothing mentioned beyond the objects: one article per object plus the background's.
        assert len(re.findall(r"\ba\b", scene.caption)) == len(scene.objects) + 1
        assert scene.caption.endswith(f" on a {scene.background} background.")


def test_objects_are_inside_the_image_apart_and_drawn_in_their_colour():
    for scene in SCENES:
        pixels = np.asarray(scene.image)
        assert scene.image.mode == "RGB" and pixels.shape == (SIZE, SIZE, 3)
        background = world.BACKGROUNDS[scene.background]
        outside = np.ones((SIZE, SIZE), dtype=bool)
        boxes = [world.object_box(o, SIZE) for o in scene.objects]
        for obj, (x0, y0, x1, y1) in zip(scene.objects, boxes):
            assert 1 <= x0 < x1 <= SIZE - 2 and 1 <= y0 < y1 <= SIZE - 2, "touches the border"
            assert tuple(pixels[(y0 + y1) // 2, (x0 + x1) // 2]) == world.COLOURS[obj.colour]
            outside[y0 : y1 + 1, x0 : x1 + 1] = False
        for (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) in itertools.combinations(boxes, 2):
            # At least one background pixel between any two objects.
            assert ax1 + 1 < bx0 or bx1 + 1 < ax0 or ay1 + 1 < by0 or by1 + 1 < ay0
        assert (pixels[outside] == background).all(), "paint outside the object boxes"
        assert len({o.position for o in scene.objects}) == len(scene.objects)


def test_sizes_differ_and_shapes_differ_in_pixels():
    large, small = (world.SceneObject("square", "red", size, "center") for size in ("large", "small"))
    large_side = world.object_box(large, SIZE)[2] - world.object_box(large, SIZE)[0] + 1
    small_side = world.object_box(small, SIZE)[2] - world.object_box(small, SIZE)[0] + 1
    assert large_side >= 1.4 * small_side and small_side >= 8
    masks = set()
    for shape in world.SHAPES:
        image = world.render("white", [world.SceneObject(shape, "red", "small", "center")], SIZE)
        masks.add(np.asarray(image)[..., 1].tobytes())
    assert len(masks) == len(world.SHAPES)


def test_colours_are_distinct_and_never_the_background():
    assert not set(world.COLOURS) & set(world.BACKGROUNDS)
    rgb = [np.array(c, dtype=float) for c in (*world.COLOURS.values(), *world.BACKGROUNDS.values())]
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(rgb, 2)) > 60
    for scene in SCENES:
        assert all(o.colour != scene.background for o in scene.objects)


def test_all_text_stays_in_the_closed_vocabulary():
    vocabulary = set(world.VOCABULARY)
    used = set()
    for line in world.corpus_lines(11, 1500):
        assert re.fullmatch(r"[a-z .,?()]+", line), line
        tokens = re.findall(r"[a-z]+|[.,?()]", line)
        assert world.words(line) == tokens
        assert set(tokens) <= vocabulary, set(tokens) - vocabulary
        used |= set(tokens)
    assert used == vocabulary, f"never used: {vocabulary - used}"
    assert len(list(world.corpus_lines(0, 4))) == 12


def expected_answer(scene, question):
    """The answer to a question, computed from scene.objects; also asserts the answer is unique."""
    objects = scene.objects
    if question == "how many shapes are there?":
        return NUMBER[len(objects)]
    if question == "what is the background colour?":
        return scene.background
    if m := re.fullmatch(r"what shape is (.+)\?", question):
        [obj] = [o for o in objects if o.position == PLACE[m[1]]]
        return obj.shape
    if m := re.fullmatch(r"what colour is the (\w+)\?", question):
        [obj] = [o for o in objects if o.shape == m[1]]
        return obj.colour
    if m := re.fullmatch(r"what size is the (\w+) (\w+)\?", question):
        [obj] = [o for o in objects if (o.colour, o.shape) == (m[1], m[2])]
        return obj.size
    if m := re.fullmatch(r"where is the (\w+) (\w+)\?", question):
        [obj] = [o for o in objects if (o.colour, o.shape) == (m[1], m[2])]
        return WHERE[obj.position]
    raise AssertionError(f"unexpected question {question!r}")


def test_open_answers_are_true_and_every_kind_is_asked():
    kinds = set()
    for scene in SCENES:
        truth = expected_answer(scene, scene.question)
        if scene.question.startswith("what shape"):
            truth = f"a {truth}"
        assert scene.answer == f"{truth}.", (scene.question, scene.answer, scene.objects)
        kinds.add(" ".join(scene.question.split()[:2]))
    assert kinds == {"how many", "what is", "what shape", "what colour", "what size", "where is"}


def test_multiple_choice_points_at_the_true_answer_and_reasoning_ends_with_its_letter():
    positions, kinds = set(), set()
    for scene in SCENES:
        assert 3 <= len(scene.choices) <= 4 and len(set(scene.choices)) == len(scene.choices)
        assert scene.choices[scene.answer_index] == expected_answer(scene, scene.mc_question)
        assert scene.reasoning.endswith(f". the answer is {'abcd'[scene.answer_index]}.")
        positions.add(scene.answer_index)
        kinds.add(" ".join(scene.mc_question.split()[:2]))
    assert positions == {0, 1, 2, 3}
    assert kinds == {"how many", "what is", "what shape", "what colour"}


def test_counting_reasoning_lists_the_objects_before_the_count():
    scene = next(s for s in SCENES if s.mc_question == "how many shapes are there?" and len(s.objects) == 3)
    listed = ", ".join(f"a {o.size} {o.colour} {o.shape} {WHERE[o.position]}" for o in scene.objects[:2])
    last = scene.objects[2]
    assert scene.reasoning.startswith(
        f"the image shows {listed} and a {last.size} {last.colour} {last.shape} {WHERE[last.position]}, "
        "so there are three shapes."
    )


def test_webdataset_shards_round_trip(tmp_path):
    uris = write_webdataset_shards(str(tmp_path / "wds"), seed=5, num_shards=2, per_shard=3, start_index=10)
    assert [u.rsplit("/", 1)[1] for u in uris] == ["00000.tar", "00001.tar"]
    index = 10
    for uri in uris:
        with tarfile.open(uri) as tar:
            members = tar.getmembers()
            assert len(members) == 9 and all(m.mtime == 0 and m.uid == 0 for m in members)
            files = {m.name: tar.extractfile(m).read() for m in members}
        for _ in range(3):
            scene = world.make_scene(5, index)
            image = Image.open(io.BytesIO(files[f"{scene.key}.png"]))
            assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(scene.image))
            assert files[f"{scene.key}.txt"].decode() == scene.caption
            meta = json.loads(files[f"{scene.key}.json"])
            assert meta["key"] == scene.key and meta["choices"] == list(scene.choices)
            assert (meta["question"], meta["answer"], meta["reasoning"]) == (
                scene.question,
                scene.answer,
                scene.reasoning,
            )
            assert meta["objects"] == [
                {"shape": o.shape, "colour": o.colour, "size": o.size, "position": o.position} for o in scene.objects
            ]
            index += 1
    again = write_webdataset_shards(str(tmp_path / "again"), seed=5, num_shards=2, per_shard=3, start_index=10)
    assert [Path(u).read_bytes() for u in uris] == [Path(u).read_bytes() for u in again]


def test_parquet_shards_round_trip(tmp_path):
    uris = write_parquet_shards(str(tmp_path / "pq"), seed=5, num_shards=2, per_shard=3)
    assert [u.rsplit("/", 1)[1] for u in uris] == ["00000.parquet", "00001.parquet"]
    rows = [row for uri in uris for row in pq.read_table(uri).to_pylist()]
    table = pq.read_table(uris[0])
    assert str(table.schema.field("choices").type) == "list<element: string>"
    assert str(table.schema.field("answer_index").type) == "int32"
    for index, row in enumerate(rows):
        scene = world.make_scene(5, index)
        assert row["key"] == scene.key
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB")), np.asarray(scene.image))
        assert row["choices"] == list(scene.choices) and row["answer_index"] == scene.answer_index
        assert [row[k] for k in ("caption", "question", "answer", "mc_question", "reasoning")] == [
            scene.caption,
            scene.question,
            scene.answer,
            scene.mc_question,
            scene.reasoning,
        ]
    again = write_parquet_shards(str(tmp_path / "again"), seed=5, num_shards=2, per_shard=3)
    assert [Path(u).read_bytes() for u in uris] == [Path(u).read_bytes() for u in again]


def test_shards_write_through_fsspec_uris_and_jpeg():
    import fsspec

    [uri] = write_webdataset_shards("memory://world-test/wds", seed=1, num_shards=1, per_shard=2, image_format="jpg")
    assert uri == "memory://world-test/wds/00000.tar"
    with fsspec.open(uri, "rb") as f, tarfile.open(fileobj=f) as tar:
        scene = world.make_scene(1, 0)
        data = tar.extractfile(f"{scene.key}.jpg").read()
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=int)
    assert np.abs(decoded - np.asarray(scene.image, dtype=int)).mean() < 8
    with pytest.raises(ValueError, match="image_format"):
        write_parquet_shards("memory://world-test/pq", seed=1, num_shards=1, per_shard=1, image_format="gif")


def test_corpus_lines_use_the_pipelines_multiple_choice_format():
    scene = world.make_scene(0, 0)
    lines = list(world.corpus_lines(0, 1))
    assert lines[2].startswith(format_choices(scene.mc_question, scene.choices) + " ")
    assert format_choices("how many shapes are there?", ["one", "two", "three"]) == (
        "how many shapes are there? (a) one (b) two (c) three"
    )
