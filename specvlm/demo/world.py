"""A procedural image world with exactly known captions, questions and answers.

Each scene is a plain background with 1-3 flat shapes, each in its own cell of a
3x3 grid. All text is lowercase, drawn from a small closed vocabulary
(`VOCABULARY`) and is a deterministic function of what is visible, so a tiny demo
VLM can learn it and a perfect model reproduces it exactly.

A scene depends only on (seed, index): generation is reproducible across
processes and machines, and different seeds or index ranges give held-out sets.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from specvlm.data.prompts import format_choices

# Saturated and far apart in RGB, so they stay distinct after a resize to 32x32.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (20, 160, 40),
    "blue": (30, 70, 230),
    "yellow": (250, 220, 0),
    "purple": (150, 40, 190),
    "orange": (255, 130, 0),
    "pink": (255, 100, 190),
}
# Disjoint from COLOURS, so an object never has the background's colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "light blue": (165, 205, 245),
}
# All start with a consonant, so the article is always "a".
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = ("small", "large")
# Grid cells in reading order; this order is the canonical order of objects in text.
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
_WHERE = {
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
NUMBERS = ("one", "two", "three", "four")
LETTERS = "abcd"
MAX_OBJECTS = 3
# Side of an object's square box as a fraction of a grid cell: large leaves a margin
# to the cell edge (so objects never touch each other or the border), small is
# clearly smaller yet still several pixels wide after a 2x downscale.
_SIZE_FRACTION = {"small": 0.5, "large": 0.8}

# Written out by hand (not derived from the templates) so the tests can prove that
# the generated text really stays inside it.
_TEMPLATE_WORDS = (
    "a and answer are at background bottom center colour how image in is it left "
    "many on right shape shapes shows so the there top what where size"
)
_PUNCTUATION = (".", ",", "?", "(", ")")
VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        set(_TEMPLATE_WORDS.split())
        | {word for name in (*COLOURS, *BACKGROUNDS) for word in name.split()}
        | set(SHAPES)
        | set(SIZES)
        | set(NUMBERS)
        | set(LETTERS)
        | set(_PUNCTUATION)
    )
)

_WORD_RE = re.compile(r"\w+|[^\w\s]+")


def words(text: str) -> list[str]:
    """Split text into vocabulary words and punctuation marks.

    The same rule as the Hugging Face `Whitespace` pre-tokenizer, so a word-level
    tokenizer trained on `corpus_lines` sees exactly these units.
    """
    return _WORD_RE.findall(text)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str  # one of POSITIONS


@dataclass(frozen=True)
class Scene:
    key: str
    image: Image.Image  # RGB, image_size x image_size
    background: str
    objects: tuple[SceneObject, ...]  # in reading order of their cells
    caption: str
    question: str
    answer: str
    mc_question: str  # the bare question; prompts.format_choices() adds the lettered choices
    choices: tuple[str, ...]
    answer_index: int
    reasoning: str  # short chain of thought ending in "the answer is <letter>."


def object_box(obj: SceneObject, image_size: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1), inclusive, that the object is drawn inside."""
    row, col = divmod(POSITIONS.index(obj.position), 3)
    bounds = [round(k * image_size / 3) for k in range(4)]
    side = round(_SIZE_FRACTION[obj.size] * image_size / 3)
    x0 = bounds[col] + (bounds[col + 1] - bounds[col] - side) // 2
    y0 = bounds[row] + (bounds[row + 1] - bounds[row] - side) // 2
    return x0, y0, x0 + side - 1, y0 + side - 1


def _draw(draw: ImageDraw.ImageDraw, obj: SceneObject, image_size: int) -> None:
    x0, y0, x1, y1 = object_box(obj, image_size)
    fill = COLOURS[obj.colour]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif obj.shape == "cross":
        side = x1 - x0 + 1
        bar = max(3, side // 3)
        lo = (side - bar) // 2  # odd sides and bars keep the cross symmetric
        draw.rectangle((x0, y0 + lo, x1, y0 + lo + bar - 1), fill=fill)
        draw.rectangle((x0 + lo, y0, x0 + lo + bar - 1, y1), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render(background: str, objects: Sequence[SceneObject], image_size: int = 64) -> Image.Image:
    # Below this the small shapes are only a few pixels wide and stop being legible.
    if image_size < 24:
        raise ValueError(f"image_size must be at least 24, got {image_size}")
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw(draw, obj, image_size)
    return image


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _looks(obj: SceneObject) -> str:
    return f"a {obj.size} {obj.colour} {obj.shape}"


def _describe(obj: SceneObject) -> str:
    return f"{_looks(obj)} {_WHERE[obj.position]}"


def caption(background: str, objects: Sequence[SceneObject]) -> str:
    return f"{_join([_describe(o) for o in objects])} on a {background} background."


def _unique(objects: Sequence[SceneObject], attribute) -> list[SceneObject]:
    """Objects whose attribute value no other object shares (their questions have one answer)."""
    counts = Counter(attribute(o) for o in objects)
    return [o for o in objects if counts[attribute(o)] == 1]


def _open_questions(background: str, objects: Sequence[SceneObject]) -> dict[str, list[tuple[str, str]]]:
    """Every answerable (question, answer) pair, by kind; kinds with none are left out."""
    by_shape = _unique(objects, lambda o: o.shape)
    by_look = _unique(objects, lambda o: (o.colour, o.shape))
    kinds = {
        "count": [("how many shapes are there?", f"{NUMBERS[len(objects) - 1]}.")],
        "background": [("what is the background colour?", f"{background}.")],
        "shape": [(f"what shape is {_WHERE[o.position]}?", f"a {o.shape}.") for o in objects],
        "colour": [(f"what colour is the {o.shape}?", f"{o.colour}.") for o in by_shape],
        "size": [(f"what size is the {o.colour} {o.shape}?", f"{o.size}.") for o in by_look],
        "position": [(f"where is the {o.colour} {o.shape}?", f"{_WHERE[o.position]}.") for o in by_look],
    }
    return {kind: pairs for kind, pairs in kinds.items() if pairs}


def _mc_items(background: str, objects: Sequence[SceneObject]) -> dict[str, list[tuple[str, str, Sequence[str], str]]]:
    """(question, correct choice, pool of choices, reasoning before the letter) by kind."""
    n = len(objects)
    kinds = {
        "count": [
            (
                "how many shapes are there?",
                NUMBERS[n - 1],
                NUMBERS,
                f"the image shows {_join([_describe(o) for o in objects])}, "
                f"so there {'is' if n == 1 else 'are'} {NUMBERS[n - 1]} shape{'' if n == 1 else 's'}.",
            )
        ],
        "background": [
            (
                "what is the background colour?",
                background,
                tuple(BACKGROUNDS),
                f"the background is {background}.",
            )
        ],
        "shape": [
            (
                f"what shape is {_WHERE[o.position]}?",
                o.shape,
                SHAPES,
                f"the shape {_WHERE[o.position]} is {_looks(o)}.",
            )
            for o in objects
        ],
        "colour": [
            (
                f"what colour is the {o.shape}?",
                o.colour,
                tuple(COLOURS),
                f"the {o.shape} is {_WHERE[o.position]} and it is {o.colour}.",
            )
            for o in _unique(objects, lambda o: o.shape)
        ],
    }
    return {kind: items for kind, items in kinds.items() if items}


def _rng(seed: int, index: int) -> random.Random:
    # A string seed is hashed with SHA-512 (never the salted hash()), and unlike
    # seed * K + index it cannot collide for large indices.
    return random.Random(f"specvlm-world:{seed}:{index}")


def make_scene(seed: int, index: int, image_size: int = 64) -> Scene:
    rng = _rng(seed, index)
    background = rng.choice(list(BACKGROUNDS))
    cells = sorted(rng.sample(range(len(POSITIONS)), rng.randint(1, MAX_OBJECTS)))
    objects = tuple(
        SceneObject(
            shape=rng.choice(SHAPES),
            colour=rng.choice(list(COLOURS)),
            size=rng.choice(SIZES),
            position=POSITIONS[cell],
        )
        for cell in cells
    )

    # Pick the kind first, so every kind is equally likely however many objects there are.
    kinds = _open_questions(background, objects)
    question, answer = rng.choice(kinds[rng.choice(list(kinds))])

    mc_kinds = _mc_items(background, objects)
    mc_question, correct, pool, thought = rng.choice(mc_kinds[rng.choice(list(mc_kinds))])
    num_choices = rng.choice((3, 4))
    choices = rng.sample([c for c in pool if c != correct], num_choices - 1)
    answer_index = rng.randrange(num_choices)
    choices.insert(answer_index, correct)

    return Scene(
        key=f"{seed:04d}-{index:07d}",
        image=render(background, objects, image_size),
        background=background,
        objects=objects,
        caption=caption(background, objects),
        question=question,
        answer=answer,
        mc_question=mc_question,
        choices=tuple(choices),
        answer_index=answer_index,
        reasoning=f"{thought} the answer is {LETTERS[answer_index]}.",
    )


def corpus_lines(seed: int, n: int, start_index: int = 0) -> Iterator[str]:
    """Text for training a tokenizer or text LM: three lines for each of n scenes.

    The lines are the caption, "question answer" and "multiple-choice prompt reasoning".
    """
    for index in range(start_index, start_index + n):
        scene = make_scene(seed, index)
        yield scene.caption
        yield f"{scene.question} {scene.answer}"
        yield f"{format_choices(scene.mc_question, scene.choices)} {scene.reasoning}"
