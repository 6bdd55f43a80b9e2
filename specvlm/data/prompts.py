"""Task prompts: captioning, visual QA and multiple choice (with chain-of-thought, or asking for the letter alone),
and reading the chosen letter back out of a multiple-choice answer.

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
# How a multiple-choice prompt asks: "cot" lets the model reason before it names a letter; "direct" asks for the
# letter alone, with the sentence LLaVA-1.5 and lmms-eval append to ScienceQA questions for their published numbers.
MC_PROTOCOLS = ("cot", "direct")
DIRECT_ANSWER = "Answer with the option's letter from the given choices directly."
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
    task: str,
    record: dict,
    *,
    caption_instruction: str = DEFAULT_CAPTION_INSTRUCTION,
    mc_suffix: str = "",
    mc_protocol: str = "cot",
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
        if mc_protocol not in MC_PROTOCOLS:
            raise PromptError(f"unknown multiple-choice protocol {mc_protocol!r}; use one of {', '.join(MC_PROTOCOLS)}")
        direct = f"\n{DIRECT_ANSWER}" if mc_protocol == "direct" else ""
        return format_choices(question, choices) + direct + mc_suffix
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


# Reading the letter back. A letter counts only as a token of its own (never the first letter of a word: "blue"
# names no b) and only among the row's choices (e with four choices names nothing). The forms, first match wins:
#   the whole answer a letter               "B", "(B)", "B.", "b"
#   a letter after the last answer marker   "the answer is (c).", "Answer: B", "The answer is: C", "option C",
#                                           "Final answer: D", "the answer is definitely C"
#   the answer opening with a letter        "D. Because ...", "(B) two", "C) red"
#   the last parenthesised letter           "... so it must be (b) two"
# After a marker, the first word may be a bare letter of either case, except a lowercase "a" or "i" followed by
# another word, which is English ("the answer is a circle"); further words in the marker's sentence count only
# in a letter's own forms: capital, in parentheses, or lowercase before punctuation or the end.
CHOICE_RULE = (
    "specvlm: a letter as a whole token within the row's choices; the whole answer, else after the last "
    "'answer (is)' / 'option' / 'choice' marker, else the answer's opening 'X.' or '(X)', else the last '(X)'"
)
_L = r"[A-Ja-j]"
_ALONE = r"(?<![\w'’-])"  # nothing word-like right before ...
_END = r"(?![\w'’-])"  # ... or right after
_WHOLE = re.compile(rf"^\W*?\(?({_L})\)?[.:)]?\s*$")
_MARKER = re.compile(r"\b(?:answer(?:\s+is)?|option|choice)\b\s*(?:[:：-]\s*)?(?:(?:option|choice|letter)\s+)?", re.I)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s|\n")
_BARE = re.compile(rf"^\(?({_L})\)?{_END}")
_LETTER_FORM = re.compile(rf"{_ALONE}(?:\(({_L})\)|([A-J]){_END}|([a-j])(?=[.,;:!?)]|\s*$))")
_OPENING = re.compile(rf"^\s*\(?({_L})(?:\)|[.:](?=\s|$))")
_PARENTHESISED = re.compile(rf"\(({_L})\)")
_CHOICE_LABEL = re.compile(r"\(([a-j])\) ")


def extract_choice(text: str | None, choices: int = len(LETTERS)) -> str | None:
    """The letter a multiple-choice answer names (CHOICE_RULE), lowercased; None when it names none of the first
    `choices` letters."""
    text = (text or "").strip()
    offered = LETTERS[:choices]

    def valid(letter: str | None) -> str | None:
        return letter.lower() if letter and letter.lower() in offered else None

    whole = _WHOLE.match(text)
    if whole and valid(whole.group(1)):
        return valid(whole.group(1))
    for marker in reversed(list(_MARKER.finditer(text))):
        found = _after_marker(_SENTENCE_END.split(text[marker.end() :], maxsplit=1)[0], valid)
        if found:
            return found
    opening = _OPENING.match(text)
    if opening and valid(opening.group(1)):
        return valid(opening.group(1))
    return next((valid(m) for m in reversed(_PARENTHESISED.findall(text)) if valid(m)), None)


def _after_marker(sentence: str, valid) -> str | None:
    bare = _BARE.match(sentence)
    if bare and not re.match(r"[ai]\s+\w", sentence) and valid(bare.group(1)):
        return valid(bare.group(1))
    for match in _LETTER_FORM.finditer(sentence):
        letter = valid(next(g for g in match.groups() if g))
        if letter:
            return letter
    return None


def choice_count(prompt: str | None) -> int:
    """How many choices a multiple-choice prompt offered (format_choices wrote them as "(a) ", "(b) ", ...): the
    letters the answer could name. All of LETTERS when the prompt lists none."""
    labels = _CHOICE_LABEL.findall(prompt or "")
    # The labels run a, b, c, ... from the last "(a) ": a question quoting "(b) " of its own does not count.
    count = 0
    for label in labels[len(labels) - 1 - labels[::-1].index("a") :] if "a" in labels else []:
        if label != LETTERS[count]:
            break
        count += 1
    return count or len(LETTERS)


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
