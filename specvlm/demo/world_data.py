"""Target training examples from the procedural world, made on the fly.

The examples of a step are a pure function of the step number (scene indices step * scenes_per_step onwards),
so there is no data state to checkpoint: a resumed run sees exactly the batches it would have seen, and no
scene is ever repeated. Each scene gives one caption and one multiple-choice example, and several questions:
its own plus others the scene can answer (`vqa_per_scene`), because a scene's single question rarely asks
where things are, and positions were what the target got wrong longest. Images go through the target's
processor as at inference.
"""

from __future__ import annotations

import random

from specvlm.data.prompts import TASKS, instruction, render
from specvlm.demo import world
from specvlm.demo.tokenizer import task_record
from specvlm.demo.world import Scene, make_scene
from specvlm.training.examples import Example, answer_ids

# Mostly the size of the demo shards (64), plus smaller and larger renderings, so the model reads any input
# the processor resizes to its 48x48, not only one resampling pattern.
IMAGE_SIZES = (64, 48, 64, 96)


def reference(scene: Scene, task: str) -> str:
    """What a perfect model answers: the caption, the short answer, or the reasoning ending in the letter."""
    return {"caption": scene.caption, "vqa": scene.answer, "mc": scene.reasoning}[task]


def scene_example(scene: Scene, task: str, processor, question: tuple[str, str] | None = None) -> Example:
    """The example of `task` on `scene`; for vqa, `question` (question, answer) replaces the scene's own."""
    record, answer = task_record(scene, task), reference(scene, task)
    if question is not None:
        record, answer = {**record, "question": question[0]}, question[1]
    prompt = render(instruction(task, record), processor)
    encoded = processor(images=scene.image, text=prompt, return_tensors="pt")
    prompt_ids = encoded["input_ids"][0].tolist()
    return Example(prompt_ids + answer_ids(processor.tokenizer, answer), len(prompt_ids), encoded["pixel_values"])


def scene_questions(scene: Scene, count: int) -> list[tuple[str, str]]:
    """The scene's own (question, answer) and up to count - 1 other answerable ones, chosen per scene."""
    # The world's own list of answerable questions (the one make_scene draws from), so the wording is identical.
    pairs = [pair for pairs in world._open_questions(scene.background, scene.objects).values() for pair in pairs]
    others = [pair for pair in pairs if pair[0] != scene.question]
    random.Random(scene.key).shuffle(others)
    return [(scene.question, scene.answer)] + others[: count - 1]


class WorldBatches:
    """batches(step) -> the examples of that step: scenes_per_step scenes of `seed`, every task of each."""

    def __init__(
        self,
        processor,
        *,
        seed: int = 0,
        scenes_per_step: int = 8,
        tasks: tuple[str, ...] = TASKS,
        vqa_per_scene: int = 3,
        image_sizes: tuple[int, ...] = IMAGE_SIZES,
    ):
        self.processor = processor
        self.seed = seed
        self.scenes_per_step = scenes_per_step
        self.tasks = tasks
        self.vqa_per_scene = vqa_per_scene
        self.image_sizes = image_sizes

    def __call__(self, step: int) -> list[Example]:
        first = step * self.scenes_per_step
        examples = []
        for index in range(first, first + self.scenes_per_step):
            scene = make_scene(self.seed, index, self.image_sizes[index % len(self.image_sizes)])
            for task in self.tasks:
                if task == "vqa":
                    examples += [
                        scene_example(scene, task, self.processor, question)
                        for question in scene_questions(scene, self.vqa_per_scene)
                    ]
                else:
                    examples.append(scene_example(scene, task, self.processor))
        return examples
