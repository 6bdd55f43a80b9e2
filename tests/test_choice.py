"""Reading the chosen letter out of a multiple-choice answer, and the two ways a multiple-choice prompt asks."""

import pytest

from specvlm.data.prompts import DIRECT_ANSWER, PromptError, choice_count, extract_choice, format_choices, instruction


@pytest.mark.parametrize(
    "text, letter",
    [
        ("B", "b"),
        ("(B)", "b"),
        ("b.", "b"),
        ("The answer is (c).", "c"),
        ("Answer: B", "b"),
        ("The answer is: C", "c"),
        ("I pick option C", "c"),
        ("Final answer: D", "d"),
        ("the answer is definitely C", "c"),
        ("D. Because the sky is clear.", "d"),
        ("C) red", "c"),
        ("it has two sides, so it must be (b) two", "b"),
    ],
)
def test_extract_choice_reads_the_common_answer_forms(text, letter):
    assert extract_choice(text, 4) == letter


@pytest.mark.parametrize(
    "text",
    [
        "blue",  # a word's first letter names nothing
        "the answer is a circle",  # English "a", not choice a
        "The answer is (e).",  # e is not among four choices
        "",
        None,
    ],
)
def test_extract_choice_names_nothing_where_the_answer_names_no_offered_letter(text):
    assert extract_choice(text, 4) is None


def test_choice_count_reads_the_labels_the_prompt_offered():
    assert choice_count(format_choices("which colour?", ["red", "blue", "green"])) == 3
    assert choice_count("no labels here") == 10


def test_mc_protocol_direct_asks_for_the_letter_alone():
    record = {"question": "which colour?", "choices": ["red", "blue"]}
    assert DIRECT_ANSWER not in instruction("mc", record)
    assert instruction("mc", record, mc_protocol="direct").endswith(DIRECT_ANSWER)
    with pytest.raises(PromptError, match="protocol"):
        instruction("mc", record, mc_protocol="guess")
