"""The speculation controller and the batch-size calibration, on costs and rates given outright: each picks what
the numbers say pays."""

import pytest
import torch

from specvlm.specdec.autobatch import START, WINDOW, AutoRows
from specvlm.specdec.controller import DepthController

DEPTH, ROWS = 5, 32


def controller(adaptive=True) -> DepthController:
    return DepthController(
        DEPTH, nodes=lambda d: d, calls=lambda d: d, rows=ROWS, device=torch.device("cpu"), adaptive=adaptive
    )


def learn_acceptance(c: DepthController, rate: float, steps: int = 50) -> None:
    """Steps at full depth in which every row accepts `rate` of the levels it tries (on average)."""
    accepted = torch.full((ROWS,), round(rate * DEPTH))
    for _ in range(steps):
        c.observe(ROWS, DEPTH, torch.full((ROWS,), DEPTH), accepted, (0.0, 0.0, 0.0), draft_calls=0)


def choose(c: DepthController, verify, draft_seconds=1e-3, rows=ROWS) -> int:
    drafted = torch.ones(rows, dtype=torch.bool)
    left = torch.full((rows,), 100)
    return c.choose(rows, drafted, left, True, verify, lambda: draft_seconds)


def test_weight_bound_verification_and_a_good_draft_draft_deep():
    c = controller()
    learn_acceptance(c, 0.8)
    # A pass over q tokens costs what a pass over one does (a large model reading its weights): draft deep.
    assert choose(c, lambda q: 20e-3) == DEPTH
    assert c.wants_drafting


def test_compute_bound_verification_makes_speculation_step_aside():
    c = controller()
    learn_acceptance(c, 0.8)
    # Every verified token costs as much as the first (a small model bound by arithmetic): plain decoding wins.
    assert choose(c, lambda q: 20e-3 * q) == 0
    assert not c.wants_drafting


def test_in_between_it_drafts_less_deep():
    c = controller()
    learn_acceptance(c, 0.6)
    depth = choose(c, lambda q: 20e-3 * (1 + 0.15 * (q - 1)), draft_seconds=2e-3)
    assert 0 < depth < DEPTH


def test_a_draft_that_is_rarely_right_is_not_used():
    c = controller()
    learn_acceptance(c, 0.0)
    assert choose(c, lambda q: 20e-3) == 0


def test_rows_close_to_their_limit_do_not_count_deep_drafts():
    c = controller()
    learn_acceptance(c, 1.0)
    drafted = torch.ones(ROWS, dtype=torch.bool)
    tokens, _ = c.expected_tokens(ROWS, drafted, torch.full((ROWS,), 2))  # 2 tokens left: at most 2 per step
    assert tokens[DEPTH] == pytest.approx(2 * ROWS, rel=0.05)


def test_without_adaptation_the_depth_is_fixed():
    c = controller(adaptive=False)
    learn_acceptance(c, 0.0)
    assert choose(c, lambda q: 20e-3 * q) == DEPTH


def test_the_batch_cap_doubles_while_tokens_per_second_rise_then_settles_at_the_best():
    rates = {START: 100.0, 2 * START: 180.0, 4 * START: 200.0, 8 * START: 201.0, 16 * START: 150.0}
    auto = AutoRows(limit=16 * START)
    while not auto.settled:
        for _ in range(WINDOW):
            auto.observe(auto.cap, True, int(rates[auto.cap]), 1.0)
    # 8 * START was the best measured, though by too little to go on doubling.
    assert auto.cap == 8 * START and set(auto.rates) == {START, 2 * START, 4 * START, 8 * START}


def test_the_batch_cap_is_only_measured_when_it_limits_the_batch():
    auto = AutoRows(limit=512)
    for _ in range(3 * WINDOW):
        auto.observe(auto.cap - 1, True, 100, 1.0)  # rows free: the cap did not limit these steps
        auto.observe(auto.cap, False, 100, 1.0)  # nobody waiting: nor these
    assert auto.rates == {} and auto.cap == START


def test_the_batch_cap_stays_within_memory():
    auto = AutoRows(limit=START // 2 + 3)
    while not auto.settled:
        for _ in range(WINDOW):
            auto.observe(auto.cap, True, auto.cap, 1.0)  # tokens/s rise with every row
    assert auto.cap == START // 2 + 3
