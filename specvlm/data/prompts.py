"""Task prompts: captioning, visual QA and multiple choice with chain-of-thought, and answer extraction.

A prompt is built in two steps: the task turns a record into an instruction, then the model's chat format
wraps it with the image placeholder. The chat format is the processor's own chat template when the checkpoint
ships one (real llava-hf checkpoints and the demo family do), or an explicit format string from the config.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

TASKS = ("caption", "vqa", "mc")
LETTERS = "abcdefghij"
DEFAULT_CAPTION_INSTRUCTION = "describe the image."
# The format of the demo family and of LLaVA-1.5; used when a processor has no chat template.
LLAVA_1_5_TEMPLATE = "USER: <image>\n{instruction} ASSISTANT:"


class PromptError(ValueError):
    pass


def format_choices(question: str, choices: Sequence[str]) -> str:
    """ "how many shapes are there? (a) one (b) two (c) three" """
    if len(choices) > len(LETTERS):
        raise PromptError(f"{len(choices)} choices, at most {len(LETTERS)} are supported")
    return " ".join([question] + [f"({LETTERS[i]}) {c}" for i, c in enumerate(choices)])


def instruction(
    task: str, record: dict, *, caption_instruction: str = DEFAULT_CAPTION_INSTRUCTION, mc_suffix: str = ""
) -> str:
    """The user's words for this record and task."""
    if task == "caption":
        return caption_instruction
    question = record.get("question")
    if not question:
        raise PromptError(f"task {task!r} needs a question, and record {record.get('key')!r} has none")
    if task == "vqa":
        return question
    if task == "mc":
        choices = record.get("choices")
        if not choices:
            raise PromptError(f"task 'mc' needs choices, and record {record.get('key')!r} has none")
        return format_choices(question, choices) + mc_suffix
    raise PromptError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")


def render(instruction_text: str, processor, template: str = "chat", *, image: bool = True) -> str:
    """Wrap an instruction in the model's chat format, with one image placeholder (none for a text-only prompt)."""
    if template == "chat":
        if getattr(processor, "chat_template", None):
            content = [{"type": "image"}] if image else []
            conversation = [{"role": "user", "content": [*content, {"type": "text", "text": instruction_text}]}]
            return processor.apply_chat_template(conversation, add_generation_prompt=True)
        template = LLAVA_1_5_TEMPLATE
    if "{instruction}" not in template:
        raise PromptError("a prompt template must contain {instruction}")
    if not image:
        placeholder = getattr(processor, "image_token", "<image>")
        template = template.replace(f"{placeholder}\n", "").replace(placeholder, "")
    return template.format(instruction=instruction_text)


_ANSWER = re.compile(r"answer is \(?([a-j])\)?", re.IGNORECASE)


def extract_choice(text: str | None) -> str | None:
    """The letter after the last 'the answer is', lowercased; None when the output names no answer."""
    found = _ANSWER.findall(text or "")
    return found[-1].lower() if found else None


def task_fields(record: dict, mapping: dict[str, str]) -> dict:
    """The record's task fields, with `input.fields` renaming them from its metadata (e.g. question: mc_question)."""
    fields = dict(record)
    if mapping and record.get("meta"):
        try:
            meta = json.loads(record["meta"])
        except ValueError:
            meta = {}
        for name, source in mapping.items():
            if source in meta:
                fields[name] = meta[source]
    return fields


def reference_strings(value) -> list[str] | None:
    """A record's references as strings: mapped from metadata they may be Hugging Face-style answer dicts."""
    if not isinstance(value, list) or not value:
        return None
    return [str(v["answer"] if isinstance(v, dict) and "answer" in v else v) for v in value]


def task_reference(task: str, fields: dict) -> str | None:
    """The reference a task's output is scored against: the caption, or the answer (a choice index as its letter)."""
    if task == "caption":
        return fields.get("caption")
    answer = fields.get("answer")
    if task == "mc" and isinstance(answer, int):
        return LETTERS[answer]
    return None if answer is None else str(answer)
