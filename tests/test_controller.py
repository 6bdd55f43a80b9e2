"""The speculation controller and the batch-size calibration, on costs and rates given outright: each picks what
the numbers say pays."""

import time

import numpy as np
import pytest
import torch

from specvlm.specdec.autobatch import START, WARMUP, WINDOW, AutoRows
from specvlm.specdec.controller import (
    LEARNING_SAMPLES,
    PROBE_EVERY,
    RELEARN_SPACING,
    SHORTFALL_STEPS,
    DepthController,
    rows_bucket,
)
from specvlm.specdec.timing import StepTimer

DEPTH, ROWS = 5, 32


def controller(adaptive=True) -> DepthController:
    return DepthController(DEPTH, nodes=lambda d: d, calls=lambda d: d, rows=ROWS, adaptive=adaptive)


def decide(c: DepthController, verify, rate: float, draft_seconds=1e-3, steps: int = 40) -> int:
    """Steps over ROWS rows, each timed by the given costs (a pass over q tokens per row takes verify(q); a draft
    pass draft_seconds), in which every row accepts `rate` of the levels it is offered; the depth chosen last."""
    drafted, left = np.ones(ROWS, dtype=bool), np.full((ROWS,), 100)
    for _ in range(steps):
        depth = c.choose(ROWS, drafted, left, True)
        seconds = (depth * draft_seconds, verify(1 + depth), 0.0)
        offered, accepted = np.full((ROWS,), depth), np.full((ROWS,), round(rate * depth))
        c.observe(ROWS, depth, offered, accepted, seconds, draft_calls=depth)
    return depth


def test_weight_bound_verification_and_a_good_draft_draft_deep():
    c = controller()
    # A pass over q tokens costs what a pass over one does (a large model reading its weights): draft deep.
    assert decide(c, lambda q: 20e-3, rate=0.8) == DEPTH
    assert c.wants_drafting


def test_compute_bound_verification_makes_speculation_step_aside():
    c = controller()
    # Every verified token costs as much as the first (a small model bound by arithmetic): plain decoding wins.
    assert decide(c, lambda q: 20e-3 * q, rate=0.8) == 0
    assert not c.wants_drafting


def test_in_between_it_drafts_less_deep():
    c = controller()
    depth = decide(c, lambda q: 20e-3 * (1 + 0.15 * (q - 1)), rate=0.6, draft_seconds=2e-3)
    assert 0 < depth < DEPTH


def test_a_draft_that_is_rarely_right_is_not_used():
    c = controller()
    assert decide(c, lambda q: 20e-3, rate=0.0) == 0


def test_costs_are_learned_from_real_steps_and_borrowed_where_the_draft_holds_no_row():
    c = controller()
    drafted, left = np.ones(ROWS, dtype=bool), np.full((ROWS,), 100)
    # A new row count: plain steps, depth-1 steps and steps of half the full depth, taking turns, each timed as it
    # commits.
    half = (DEPTH + 1) // 2
    for _ in range(LEARNING_SAMPLES):
        for depth in (0, 1, half):
            assert c.choose(ROWS, drafted, left, True) == depth
            full = np.full((ROWS,), depth)
            c.observe(ROWS, depth, full, full, (depth * 1e-3, 20e-3, 0.0), draft_calls=depth)
    assert c.choose(ROWS, drafted, left, True) > 1  # learned: cheap, accepted
    big = rows_bucket(ROWS)
    # Rows at another count that the draft does not hold: no drafted step is possible. Plain steps time the target,
    # and drafting is priced from the count that learned it, scaled by the plain steps of the two (no pass is run
    # that commits nothing: the controller has no way to run one).
    small, n = rows_bucket(8), 8
    for _ in range(LEARNING_SAMPLES):
        assert c.choose(n, np.zeros(n, dtype=bool), left[:n], True) == 0
        c.observe(n, 0, np.zeros(n), np.zeros(n), (0.0, 8e-3, 0.0), draft_calls=0)
    c.choose(n, np.zeros(n, dtype=bool), left[:n], True)
    scale = (8e-3 / n) / (20e-3 / ROWS)
    assert c.verify_s[small][1 + half] == pytest.approx(c.verify_s[big][1 + half] * scale)
    assert c.draft_s[small] == pytest.approx({k: v * scale for k, v in c.draft_s[big].items()})
    assert small in c.borrowed and small not in c.learning
    # Once the draft holds rows there, that count learns from its own real steps.
    assert c.choose(n, np.ones(n, dtype=bool), left[:n], True) == 0
    assert small not in c.borrowed and set(c.learning[small]) == {1, 2, 1 + half, "draft"}


def test_a_draft_phase_is_priced_whole_not_per_pass():
    # Each draft phase pays a set-up (its first pass feeds what the target committed; proposing has its own work)
    # besides its passes: 12 ms + 0.5 ms a pass. Verification costs 20 ms + 10% per extra token; half the rows
    # accept one level, none a second. Plain decoding is the fastest (depth 1: 1.5 tokens in 34.5 ms against 1 in
    # 20 ms). One price per pass, the cheapest seen (4.5 ms, from the three-pass learning steps), would price
    # depth 1 at 26.5 ms and take it.
    c = controller()
    drafted, left = np.ones(ROWS, dtype=bool), np.full((ROWS,), 1000)
    chosen = []
    for _ in range(60):
        depth = c.choose(ROWS, drafted, left, True)
        phase = 12e-3 + 0.5e-3 * depth if depth else 0.0
        offered, accepted = np.full((ROWS,), depth), np.tile([min(depth, 1), 0], ROWS // 2)  # level 1: a half
        c.observe(ROWS, depth, offered, accepted, (phase, 20e-3 * (1 + 0.1 * depth), 0.0), draft_calls=depth)
        chosen.append(depth)
    assert steady_at(chosen[-30:], 0)


def test_a_steep_first_extra_token_does_not_overprice_deep_windows():
    # A one-token pass takes a faster path: the second token costs as much as the first, every later one little.
    # A line through 1 and 2 tokens alone would price depth 1 at 41 ms and find no depth worth drafting.
    c = controller()
    assert decide(c, lambda q: 20e-3 if q == 1 else 40e-3 + 2e-3 * (q - 2), rate=0.8) >= 3


def run_steps(c: DepthController, verify, draft, rate: float, steps: int) -> list[int]:
    """Steps over ROWS rows timed by verify(step, q) and draft(step) (seconds of a pass at the step's index), every
    row accepting `rate` of the levels it is offered; the depths chosen."""
    drafted, left = np.ones(ROWS, dtype=bool), np.full((ROWS,), 1000)
    chosen = []
    for step in range(steps):
        depth = c.choose(ROWS, drafted, left, True)
        seconds = (depth * draft(step), verify(step, 1 + depth), 0.0)
        offered, accepted = np.full((ROWS,), depth), np.full((ROWS,), round(rate * depth))
        c.observe(ROWS, depth, offered, accepted, seconds, draft_calls=depth)
        chosen.append(depth)
    return chosen


def steady_at(chosen: list[int], depth: int) -> bool:
    """Every step at `depth`, but for the probes of a neighbouring depth (one step in PROBE_EVERY)."""
    return sum(d != depth for d in chosen) <= len(chosen) // PROBE_EVERY + 1


def test_one_slow_first_draft_pass_does_not_keep_a_good_draft_unused():
    # A draft that is a copy of the target on a target bound by reading weights: drafting deep pays 3x or more. The
    # first draft pass pays a one-off set-up 30 times its cost; priced from that step alone, drafting looks ruinous
    # and, never chosen again, is never timed again.
    chosen = run_steps(controller(), lambda step, q: 20e-3, lambda step: 0.3 if step == 1 else 1e-3, 1.0, 30)
    learning = 3 * LEARNING_SAMPLES
    assert steady_at(chosen[learning:], DEPTH)


def test_one_slow_first_plain_step_does_not_keep_a_useless_draft_in_use():
    # A draft that is never right, on a target for which a second token costs a tenth of the first: plain decoding is
    # the best. The first plain step is ten times slow; priced from it alone, depth 1 looks cheaper than plain, and
    # the steps that follow move every count by the same time, so the difference stays.
    chosen = run_steps(
        controller(), lambda step, q: 0.2 if step == 0 else 20e-3 * (0.9 + 0.1 * q), lambda s: 1e-3, 0.0, 40
    )
    assert steady_at(chosen[-20:], 0)


def test_a_machine_that_turns_compute_bound_is_re_learned_before_the_refresh():
    # Weight-bound at first (a window costs what one token does): a good draft drafts deep. Then another process
    # takes the cores and every verified token costs what the first does: deep windows now lose to plain decoding.
    # Moving all counts by the step's time would keep the old, flat differences until the next refresh (60 s); the
    # steps deliver far less than predicted, so the costs are re-learned (once the spacing since the first learning
    # has passed).
    learning = 3 * LEARNING_SAMPLES
    change = learning + RELEARN_SPACING * learning
    verify = lambda step, q: 20e-3 if step < change else 20e-3 * q
    relearned = change + SHORTFALL_STEPS + 3 * LEARNING_SAMPLES  # noticed, then three samples of three costs
    chosen = run_steps(controller(), verify, lambda step: 1e-3, 0.8, relearned + 10)
    assert steady_at(chosen[change - 20 : change], DEPTH)
    assert steady_at(chosen[relearned:], 0)


def test_a_busy_machine_does_not_keep_a_good_draft_learning():
    # Another process takes the core at random: every step takes 1-3x its own time, whatever its depth. Slowing
    # every depth alike, that changes nothing about which depth is best, so after its first learning the
    # controller should draft at full depth, not go back to the plain and shallow steps of learning again and again.
    # Learned on disturbed steps, a depth next to the best may look worse than it is; the probes find it out.
    noise = np.random.default_rng(0).uniform(1.0, 3.0, size=400)
    chosen = run_steps(controller(), lambda step, q: 20e-3 * noise[step], lambda step: 1e-3 * noise[step], 1.0, 400)
    assert steady_at(chosen[200:], DEPTH)


def test_a_draft_that_is_never_right_is_not_timed_again():
    c = controller()
    drafted, left = np.ones(ROWS, dtype=bool), np.full((ROWS,), 100)
    chosen = []
    for _ in range(30):
        depth = c.choose(ROWS, drafted, left, True)
        offered = np.full((ROWS,), depth)
        c.observe(ROWS, depth, offered, np.zeros(ROWS), (depth * 1e-3, 20e-3, 0.0), draft_calls=depth)
        chosen.append(depth)
    # A few drafted learning steps show that it accepts nothing; after that, not one more drafted step.
    assert sum(d > 0 for d in chosen) <= LEARNING_SAMPLES and chosen[-20:] == [0] * 20
    assert not c.wants_drafting
    # Rows at a new count, which the draft does not hold: plain, with no learning (free drafting would not pay).
    assert c.choose(8, np.zeros(8, dtype=bool), left[:8], True) == 0


def test_a_deeper_step_is_never_priced_below_a_shallower_one():
    # Plain steps timed at a busy moment, drafted ones not: the cost model must still not price a step that drafts
    # (the same pass over more tokens, and draft passes besides) below one that does not.
    c = controller()
    c.verify_s[0] = {1: 30e-3, 2: 20e-3, 4: 25e-3}
    c.draft_s[0] = {1: 1e-3}
    seconds = c.step_seconds(1)
    assert seconds == sorted(seconds)


def test_learning_steps_stay_within_what_rows_can_use():
    c = controller()
    drafted, left = np.ones(ROWS, dtype=bool), np.full((ROWS,), 2)  # 1 draft token is all that fits
    for _ in range(LEARNING_SAMPLES):
        assert c.choose(ROWS, drafted, left, True) == 0
        c.observe(ROWS, 0, np.zeros(ROWS), np.zeros(ROWS), (0.0, 20e-3, 0.0), draft_calls=0)
        assert c.choose(ROWS, drafted, left, True) == 1
        c.observe(ROWS, 1, np.ones(ROWS), np.ones(ROWS), (1e-3, 20e-3, 0.0), draft_calls=1)
    assert c.choose(ROWS, drafted, left, True) <= 1  # learning is over
    assert not c.learning


def test_rows_close_to_their_limit_do_not_count_deep_drafts():
    c = controller()
    decide(c, lambda q: 20e-3, rate=1.0)
    drafted = np.ones(ROWS, dtype=bool)
    tokens, _ = c.expected_tokens(ROWS, drafted, np.full((ROWS,), 2))  # 2 tokens left: at most 2 per step
    assert tokens[DEPTH] == pytest.approx(2 * ROWS, rel=0.05)


def test_without_adaptation_the_depth_is_fixed():
    c = controller(adaptive=False)
    assert decide(c, lambda q: 20e-3 * q, rate=0.0) == DEPTH


def test_the_batch_cap_doubles_while_tokens_per_second_rise_then_settles_at_the_best():
    rates = {START: 100.0, 2 * START: 180.0, 4 * START: 200.0, 8 * START: 201.0, 16 * START: 150.0}
    auto = AutoRows(limit=16 * START)
    while not auto.settled:
        for _ in range(WARMUP + WINDOW):
            auto.observe(auto.cap, True, int(rates[auto.cap]), 1.0)
    # 8 * START was the best measured, though by too little to go on doubling.
    assert auto.cap == 8 * START and set(auto.rates) == {START, 2 * START, 4 * START, 8 * START}


def test_the_first_steps_at_a_new_cap_are_not_measured():
    # Doubling the cap pays 6%, but its first steps run at a tenth of that (its rows filling, the controller
    # learning the costs of a row count it had not seen): counted in, they would hide the gain.
    rates = {START: 100, 2 * START: 106}
    auto = AutoRows(limit=2 * START)
    while not auto.settled:
        cap = auto.cap
        for step in range(WARMUP + WINDOW):
            slow = step < WARMUP and cap > START
            auto.observe(cap, True, rates[cap] // 10 if slow else rates[cap], 1.0)
    assert auto.rates == rates and auto.cap == 2 * START


def test_the_batch_cap_is_only_measured_when_it_limits_the_batch():
    auto = AutoRows(limit=512)
    for _ in range(3 * WINDOW):
        auto.observe(auto.cap - 1, True, 100, 1.0)  # rows free: the cap did not limit these steps
        auto.observe(auto.cap, False, 100, 1.0)  # nobody waiting: nor these
    assert auto.rates == {} and auto.cap == START


def test_the_batch_cap_stays_within_memory():
    auto = AutoRows(limit=START // 2 + 3)
    while not auto.settled:
        for _ in range(WARMUP + WINDOW):
            auto.observe(auto.cap, True, auto.cap, 1.0)  # tokens/s rise with every row
    assert auto.cap == START // 2 + 3


def test_on_one_torch_thread_a_step_is_timed_by_its_own_work():
    # Another process taking the core stops the decoding thread as sleeping does: the step's own work is unchanged,
    # and so must be its measured time, or a busy machine misprices whichever depth ran at the busy moment.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timer = StepTimer(torch.device("cpu"))
        timer.mark()
        time.sleep(0.05)
        timer.mark()
        (seconds,) = timer.phases()
    finally:
        torch.set_num_threads(threads)
    assert seconds < 0.01


def test_while_the_draft_holds_no_row_the_choice_is_not_priced_every_step(monkeypatch):
    c = controller()
    n, undrafted, left = 8, np.zeros(8, dtype=bool), np.full((8,), 100)
    priced = []
    step_seconds = c.step_seconds
    monkeypatch.setattr(c, "step_seconds", lambda rows: priced.append(rows) or step_seconds(rows))
    for _ in range(LEARNING_SAMPLES + 4 * PROBE_EVERY):
        assert c.choose(n, undrafted, left, True) == 0
        c.observe(n, 0, np.zeros(n), np.zeros(n), (0.0, 8e-3, 0.0), draft_calls=0)
    assert 0 < len(priced) <= 5  # once the count learned its plain steps, then once every PROBE_EVERY steps
    # A new row count is priced at once.
    c.choose(n - 1, undrafted[:-1], left[:-1], True)
    assert priced[-1] == n - 1
