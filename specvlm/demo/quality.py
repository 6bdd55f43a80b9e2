"""Quality of a target and its drafts on held-out world scenes, measured through the engine (greedy).

- target: exact match of the decoded text (special tokens skipped, surrounding spaces stripped) with the
  scene's caption / answer / reasoning, and the multiple-choice accuracy of the extracted letter;
- each draft x gamma x task: block efficiency tau and acceptance rate, as the engine reports them, and whether
  the speculative output is token-identical to the target's autoregressive output (it must be);
- per-token acceptance split into content words (colours, shapes, sizes, counts, positions, backgrounds) and
  the other tokens, the comparison Gagrani, Goel et al. make between text-only and image-aware drafts.

Per-token outcomes are rebuilt from the engine's accepted_per_step: a chain step that accepted a of gamma
drafts committed a accepted tokens, then one target token at a position where the draft had proposed
something else (a rejection) unless a == gamma (a bonus token nobody proposed).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from specvlm.data.prompts import LETTERS, TASKS, extract_choice, instruction, render
from specvlm.demo.tokenizer import task_record
from specvlm.demo.world import BACKGROUNDS, COLOURS, NUMBERS, SHAPES, SIZES, Scene, make_scene
from specvlm.demo.world_data import reference
from specvlm.engine import build_draft
from specvlm.specdec.decode import DecodeConfig, SpeculativeDecoder
from specvlm.specdec.metrics import pool
from specvlm.specdec.requests import Request

CONTENT_WORDS = frozenset(
    {w for name in (*COLOURS, *BACKGROUNDS) for w in name.split()}
    | set(SHAPES)
    | set(SIZES)
    | set(NUMBERS)
    | {"top", "bottom", "left", "right", "center"}
)
_WORD = re.compile(r"\w+")


def scene_requests(scenes: list[Scene], task: str, processor) -> list[Request]:
    requests = []
    for scene in scenes:
        prompt = render(instruction(task, task_record(scene, task)), processor)
        encoded = processor(images=scene.image, text=prompt, return_tensors="pt")
        requests.append(Request(encoded["input_ids"][0].tolist(), encoded["pixel_values"]))
    return requests


def decode_all(
    target_model, draft, requests: list[Request], *, max_new_tokens: int = 96, eos_token_id: int, batch_size: int = 8
):
    """Every request through the engine, `batch_size` rows at a time, the draft at its full depth every step
    (this measures the draft, not the controller)."""
    config = DecodeConfig(
        max_new_tokens=max_new_tokens, eos_token_ids=(eos_token_id,), max_rows=batch_size, adaptive=False
    )
    results = SpeculativeDecoder(target_model, draft, config).generate(requests)
    failed = [r.error for r in results if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed to decode, e.g. {failed[0]}")
    return results


def is_correct(text: str, scene: Scene, task: str) -> bool:
    if task == "mc":
        return extract_choice(text) == LETTERS[scene.answer_index]
    return text == reference(scene, task)


def token_outcomes(n_tokens: int, accepted_per_step: list[int], gamma: int) -> list[bool | None]:
    """Per generated token: True (a draft proposed it and was accepted), False (the draft proposed something
    else there), None (no draft proposal was compared at that position)."""
    outcomes: list[bool | None] = []
    for accepted in accepted_per_step:
        outcomes += [True] * accepted
        if len(outcomes) < n_tokens:
            outcomes.append(False if accepted < gamma else None)
    return outcomes[:n_tokens]


def content_tokens(tokens: list[int], tokenizer) -> list[tuple[bool, bool]]:
    """Per token: (is it part of a content word, is it that word's first token). A token belongs to the word
    holding its first letter; the first token of a word is the draft's real guess, later pieces of a split
    word ("yel" -> "low") are easy once the first is known."""
    special = set(tokenizer.all_special_ids)
    pieces = [tokenizer.decode([t]) if t not in special else "" for t in tokens]
    text = "".join(pieces)
    word_at = {}
    for match in _WORD.finditer(text):
        for i in range(match.start(), match.end()):
            word_at[i] = (match.start(), match.group())
    classes, offset = [], 0
    for piece in pieces:
        first = next((offset + i for i, ch in enumerate(piece) if not ch.isspace()), None)
        start, word = word_at.get(first, (None, None))
        classes.append((word in CONTENT_WORDS, word in CONTENT_WORDS and start == first))
        offset += len(piece)
    return classes


@dataclass
class Acceptance:
    accepted: int = 0
    compared: int = 0

    def add(self, outcome: bool | None) -> None:
        if outcome is not None:
            self.compared += 1
            self.accepted += int(outcome)

    @property
    def rate(self) -> float:
        return self.accepted / self.compared if self.compared else float("nan")


@dataclass
class DraftRow:
    draft: str
    gamma: int
    task: str
    tau: float
    acceptance: float
    identical: bool  # every output token-identical to the target's autoregressive output
    content: Acceptance = field(default_factory=Acceptance)  # every token of a content word
    content_first: Acceptance = field(default_factory=Acceptance)  # first tokens of content words only
    other: Acceptance = field(default_factory=Acceptance)


@dataclass
class Report:
    scenes: int
    target_exact: dict[str, float]  # task -> fraction exactly right (mc: right letter)
    target_tokens: dict[str, float]  # task -> mean generated tokens
    rows: list[DraftRow]

    def table(self) -> str:
        lines = [
            f"held-out scenes: {self.scenes}",
            "",
            "target (greedy, autoregressive through the engine)",
            f"{'task':<8} {'exact':>7} {'tokens':>7}",
        ]
        for task, exact in self.target_exact.items():
            lines.append(f"{task:<8} {exact:>7.1%} {self.target_tokens[task]:>7.1f}")
        lines += [
            "",
            "per-token acceptance: content = colour, shape, size, count, position and background words "
            "(all their tokens / first token only), other = the rest",
            f"{'draft':<6} {'gamma':>5} {'task':<8} {'tau':>5} {'accept':>7} {'content':>8} {'first':>7} "
            f"{'other':>7} {'identical':>9}",
        ]
        for r in self.rows:
            lines.append(
                f"{r.draft:<6} {r.gamma:>5} {r.task:<8} {r.tau:>5.2f} {r.acceptance:>7.1%} "
                f"{r.content.rate:>8.1%} {r.content_first.rate:>7.1%} {r.other.rate:>7.1%} "
                f"{r.identical!s:>9}"
            )
        return "\n".join(lines)


def evaluate(
    target,
    drafts: dict,
    *,
    seed: int = 1,
    scenes: int = 100,
    gammas=(3, 5),
    tasks=TASKS,
    batch_size: int = 8,
    max_new_tokens: int = 96,
) -> Report:
    """target: a LoadedTarget; drafts: name -> the draft's settings (its gamma is replaced by each of gammas)."""
    world = [make_scene(seed, i) for i in range(scenes)]
    tokenizer, eos = target.tokenizer, target.tokenizer.eos_token_id
    exact, lengths, rows = {}, {}, []
    for task in tasks:
        requests = scene_requests(world, task, target.processor)
        reference_results = decode_all(
            target.model, None, requests, max_new_tokens=max_new_tokens, eos_token_id=eos, batch_size=batch_size
        )
        texts = [tokenizer.decode(r.tokens, skip_special_tokens=True).strip() for r in reference_results]
        exact[task] = sum(is_correct(t, s, task) for t, s in zip(texts, world)) / len(world)
        lengths[task] = sum(len(r.tokens) for r in reference_results) / len(world)
        classes = [content_tokens(r.tokens, tokenizer) for r in reference_results]
        for name, draft in drafts.items():
            for gamma in gammas:
                draft_at_gamma = build_draft(dataclasses.replace(draft, gamma=gamma), target)
                results = decode_all(
                    target.model,
                    draft_at_gamma,
                    requests,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=eos,
                    batch_size=batch_size,
                )
                pooled = pool(r.metrics for r in results)
                row = DraftRow(
                    name,
                    gamma,
                    task,
                    tau=pooled.block_efficiency,
                    acceptance=pooled.acceptance_rate,
                    identical=all(r.tokens == ref.tokens for r, ref in zip(results, reference_results)),
                )
                for result, kinds in zip(results, classes):
                    outcomes = token_outcomes(len(result.tokens), result.metrics.accepted_per_step, gamma)
                    for outcome, (is_content, is_first) in zip(outcomes, kinds):
                        (row.content if is_content else row.other).add(outcome)
                        if is_first:
                            row.content_first.add(outcome)
                rows.append(row)
    return Report(scenes, exact, lengths, rows)
