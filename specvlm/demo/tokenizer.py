"""The demo tokenizer and the chat template of the demo family.

The tokenizer is byte-level BPE (`build_tokenizer`) trained on the world's text plus the rendered prompts of
all three tasks, so the prompt words are tokens too. Its size is a lever on speculative decoding, not only on
model size: with ~430 entries every word of the world is one token, and a text-only draft, which cannot see
the colours and shapes, is wrong on nearly every content word (tau ~2.6 at gamma=5, measured). At 360 the
rarer content words ("yellow", "center", "triangle") split into two or three pieces of which only the first
is a guess, like the long tail of a real tokenizer (Gagrani, Goel et al.: "vege" -> "tables"), and a text-only draft
reaches tau ~3.4 while captions grow from ~21 to ~34 tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

from transformers import PreTrainedTokenizerFast

from specvlm.data.prompts import LLAVA_1_5_TEMPLATE, instruction
from specvlm.demo.world import make_scene
from specvlm.models.build import build_tokenizer

DEMO_VOCAB_SIZE = 360
TOKENIZER_SCENES = 2000  # plenty: the world's vocabulary is closed and every word occurs in a few hundred scenes

# LLaVA-1.5's conversation format: "USER: <image>\n{text} ASSISTANT:" for one user turn with an image and
# add_generation_prompt; an answer turn is "ASSISTANT: {text}</s>". Content may be a string or a list of
# {"type": "image"} / {"type": "text", "text": ...} parts; images come first, as in llava-hf's template.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- set text = parts | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- 'USER: ' -}}"
    "{%- for part in parts if part['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{{- text + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'ASSISTANT: ' + text + '</s>' -}}"
    "{%- else -%}"
    "{{- text + ' ' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def task_record(scene, task: str) -> dict:
    """The record fields `prompts.instruction` reads for `task` (mc asks the scene's multiple-choice question)."""
    if task == "mc":
        return {"key": scene.key, "question": scene.mc_question, "choices": list(scene.choices)}
    return {"key": scene.key, "question": scene.question}


def demo_corpus(seed: int = 0, scenes: int = TOKENIZER_SCENES) -> Iterator[str]:
    """Per scene: the caption, the question and answer, and the full rendered prompt of each task with its answer."""
    for index in range(scenes):
        scene = make_scene(seed, index)
        answers = {"caption": scene.caption, "vqa": scene.answer, "mc": scene.reasoning}
        for task, answer in answers.items():
            prompt = LLAVA_1_5_TEMPLATE.format(instruction=instruction(task, task_record(scene, task)))
            yield f"{prompt} {answer}"


def build_demo_tokenizer(
    vocab_size: int = DEMO_VOCAB_SIZE, scenes: int = TOKENIZER_SCENES, seed: int = 0
) -> PreTrainedTokenizerFast:
    return build_tokenizer(demo_corpus(seed, scenes), vocab_size)
