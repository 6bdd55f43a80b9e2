"""Speculation that adapts to load: every step, the draft depth that maximises expected tokens per second.

A step of depth d (d = 0 is plain decoding) over n rows costs

    T(d) = verify(n, 1 + nodes(d)) + calls(d) * draft(n) + rest(n, d > 0)

seconds: one target pass over each row's last token and its nodes(d) draft tokens, calls(d) draft passes, and
the step's bookkeeping. It commits, in expectation, the sum over rows of

    E(d) = 1 + a + a^2 + ... + a^min(d, left - 1)

tokens, where `left` is what the row may still generate and a is its level acceptance: the chance that the
accepted path reaches one level deeper once it reached the level above (a chain's acceptance rate; for a tree,
of its best path). a is estimated per row from its own steps, shrunk towards the running value of all rows
(a row that just joined has seen nothing). The controller picks argmax_d E(d) / T(d). Under light load a
verification pass costs about what a one-token pass does and drafting deeper pays; as rows are added the target
turns compute-bound (every verified token is arithmetic), verify(n, q) grows with q, and the best depth falls,
to 0 when speculation no longer pays. That is how speculation steps aside by itself.

The costs are measured here, on the machine that decodes, by the steps themselves. The first time the batch
has about n rows, and every REFRESH_S seconds after, the controller learns that row count's costs from real
steps, which commit tokens like any other: a plain step times the target over 1 token per row, a step of depth
1 times it over 1 + nodes(1) and times one draft pass, and a step of half the full depth times a deeper window.
Each is timed by LEARNING_SAMPLES steps, taking turns (plain, depth 1, half depth, plain, ...), and the fastest
counts: a cost learned from one step is at the mercy of that step (the first pass of a shape pays one-off set-up,
another process takes the core for a moment), and a cost that is overpriced so is never chosen again, so never
timed again. What disturbs a step only ever adds time, and on a shared machine it disturbs many (on two cores at
load 6, a third of the demo target's passes took 2-4x their usual time), so the fastest of three is a far safer
estimate than their median, which two slow steps out of three decide. Only when the draft holds no row (so no
drafted step is possible) do scratch passes (forwards that commit nothing) stand in for the drafted steps.
Past one token, verification costs grow about linearly with the tokens per row, so other counts are interpolated
between measured ones, or extrapolated along the last two. The deeper step is what makes that line true: the step
from 1 to 2 tokens is often steeper than the ones after it (a one-token pass takes a faster path), and a line
through those two alone would overprice every deeper window.

Every step then refines what it used: its phases are timed and folded into moving averages, which adds the
deeper counts as the controller drafts deeper. A step's verification time moves every count of its row bucket,
not just its own: passes grow slower as outputs grow (attention reads more cache), and a count that is not
being chosen would otherwise keep the time it had when the outputs were short, and look cheaper than the one in
use for no reason but staleness. It moves them by the same time, not the same factor: what grows is the read of
each row's cache, which a window of one token pays as much as a deep one (by the same factor, measured, the
deep windows came out overpriced late in a run).
Moving every count by the same time keeps the differences between counts as they were learned, so the steps also
check the model against what they deliver: when the recent steps of a bucket (about SHORTFALL_STEPS of them) took
so much longer than predicted, together, that they realised less than SHORTFALL of the tokens per second the model
promised, the bucket re-learns its costs at once instead of at the next refresh (a machine whose load changed can
turn a target from bound by reading weights, where deep windows cost little more than one token, to bound by
arithmetic, where they cost in proportion).
Tables are indexed by a bucket of the row count, so they follow the load and the machine, and hold seconds per
row, because within a bucket a pass costs about in proportion to its rows (a batch that drains stays priced).

Greedy output does not depend on the depths chosen (every committed token is the target's argmax). Sampled
output does: rejection sampling's random choices depend on what was drafted. So under sampling the depth is
fixed at the draft's full depth, which keeps a sampled request's output a function of its seed alone, whatever
its batch and whenever it joined.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

REFRESH_S = 60.0  # seconds between re-measurements of a bucket: a cost measured badly once cannot stick, and
# the scratch passes stay a small share of the time (four passes a minute)
LEARNING_SAMPLES = 3  # steps that time each cost while a bucket learns: the fastest counts (see the docstring)
SHORTFALL = 0.75  # predicted over realised seconds of recent steps, below which a bucket re-learns its costs
SHORTFALL_STEPS = 8  # about how many recent steps that compares; also the steps after learning before it may
PRIOR_WEIGHT = 4.0  # steps' worth of evidence the running acceptance of all rows counts for in a row's estimate
SMOOTHING = 0.2  # weight of a new measurement in the moving averages
HYSTERESIS = 1.03  # drafting for rows that join must promise this much over plain decoding


def rows_bucket(n: int) -> int:
    """Row counts whose costs are kept together: an octave apart (1, 2, 4, 8, ...). The choice rests on ratios
    of costs at one row count (a deeper pass over a one-token pass, a draft pass over a target pass), which
    change slowly with the rows; finer buckets would only multiply the scratch passes of a batch that drains."""
    return round(math.log2(max(n, 1)))


class DepthController:
    def __init__(
        self,
        max_depth: int,
        nodes: Callable[[int], int],
        calls: Callable[[int], int],
        rows: int,
        adaptive: bool,
    ):
        self.max_depth = max_depth
        self.learning_depths = sorted({1, math.ceil(max_depth / 2)}) if max_depth > 0 else []
        self.nodes = nodes  # depth -> draft tokens verified per row
        self.calls = calls  # depth -> draft forward passes
        self.adaptive = adaptive
        # Seconds per row (see the docstring):
        self.verify_s: dict[int, dict[int, float]] = {}  # rows bucket -> tokens per row -> a target pass
        self.draft_s: dict[int, float] = {}  # rows bucket -> a draft pass
        self.rest_s: dict[tuple[int, bool], float] = {}  # (rows bucket, drafting) -> a step's bookkeeping
        self.measured_at: dict[int, float] = {}  # rows bucket -> when its costs were last (re)learned
        # rows bucket -> what its steps are timing while it learns (token counts, "draft") -> the seconds per row
        # measured so far; a bucket's entry goes when every cost has LEARNING_SAMPLES of them
        self.learning: dict[int, dict[int | str, list[float]]] = {}
        # rows bucket -> (steps checked since it learned, moving averages of the predicted and the realised seconds)
        self.realised: dict[int, tuple[int, float, float]] = {}
        self.prediction: tuple[int, float] | None = None  # (rows bucket, seconds) the chosen step was priced at
        self.level_acceptance: float | None = None  # running value over all rows
        # Per row, on the host (the controller never reads the device): levels accepted out of levels tried.
        self.accepted = np.zeros(rows)
        self.tried = np.zeros(rows)
        self.depths: dict[int, int] = {}  # how often each depth was chosen
        self.wants_drafting = True

    # Rows follow the engine's row moves.
    def resize(self, rows: int) -> None:
        for name in ("accepted", "tried"):
            old = getattr(self, name)
            new = np.zeros(rows)
            new[: min(rows, len(old))] = old[:rows]
            setattr(self, name, new)

    def reset_rows(self, rows: list[int]) -> None:
        self.accepted[rows] = 0
        self.tried[rows] = 0

    def move_rows(self, dst: list[int], src: list[int]) -> None:
        self.accepted[dst] = self.accepted[src]
        self.tried[dst] = self.tried[src]

    def expected_tokens(self, n: int, drafted: np.ndarray, left: np.ndarray) -> tuple[list[float], list[float]]:
        """Expected tokens committed by a step of each depth 0..max_depth, summed over rows [0, n): as the rows
        are (only `drafted` rows can accept drafts), and were the draft to hold every row."""
        prior = 0.5 if self.level_acceptance is None else self.level_acceptance
        a = (self.accepted[:n] + PRIOR_WEIGHT * prior) / (self.tried[:n] + PRIOR_WEIGHT)  # [n]
        depth = np.arange(self.max_depth + 1)
        cumulative = np.cumsum(a[:, None] ** depth, axis=1)  # [n, D+1]: 1 + a + ... + a^d
        reach = np.minimum(depth[None, :], np.clip(left - 1, 0, None)[:, None])  # a row cannot pass its limit
        per_row = np.take_along_axis(cumulative, reach, axis=1)
        actual = np.where(drafted[:, None], per_row, 1.0).sum(0)
        return actual.tolist(), per_row.sum(0).tolist()

    def _learn(self, bucket: int, reach: int) -> dict[int | str, list[float]]:
        """The costs still to time at this bucket before they are trusted, with their samples so far; starts a
        (re)learning when due, and ends it when every cost has its samples.
        reach: the deepest step any row can use now; a deeper window waits for the next (re)learning."""
        if time.perf_counter() - self.measured_at.get(bucket, -REFRESH_S) >= REFRESH_S:
            windows = {1 + self.nodes(d) for d in self.learning_depths}
            items = {1} | windows | ({"draft"} if self.calls(1) > 0 else set())
            self.learning[bucket] = {item: [] for item in items}
            self.measured_at[bucket] = time.perf_counter()
            # Deeper counts were timed on the old costs; the deeper steps chosen from the new ones time them again.
            self.verify_s.pop(bucket, None)
        learning = self.learning.get(bucket, {})
        for d in self.learning_depths:
            if d > reach:
                learning.pop(1 + self.nodes(d), None)
        needed = {item: samples for item, samples in learning.items() if len(samples) < LEARNING_SAMPLES}
        if bucket in self.learning and not needed:
            del self.learning[bucket]
            self.realised.pop(bucket, None)  # the prediction is checked afresh against the new costs
        return needed

    def _scratch(self, n: int, probe_verify: Callable[[int], float], probe_draft: Callable[[], float]) -> None:
        """Time what the learning steps would, with passes that commit nothing."""
        bucket = rows_bucket(n)
        learning = self.learning.pop(bucket)
        self.realised.pop(bucket, None)
        for q, samples in learning.items():
            if q not in (1, "draft") and len(samples) < LEARNING_SAMPLES:
                self.verify_s.setdefault(bucket, {})[q] = min(probe_verify(q) / n for _ in range(LEARNING_SAMPLES))
        if len(learning.get("draft", ())) < LEARNING_SAMPLES:
            self.draft_s[bucket] = min(probe_draft() / n for _ in range(LEARNING_SAMPLES))

    def verify_seconds(self, bucket: int, q: int) -> float:
        """A pass over q tokens per row, per row: measured, interpolated between the nearest measured counts, or
        extrapolated along the two largest (a pass never costs less than a smaller one)."""
        table = self.verify_s[bucket]
        if q in table:
            return table[q]
        below = max((k for k in table if k < q), default=None)
        above = min((k for k in table if k > q), default=None)
        if above is None:
            counts = sorted(table)
            if len(counts) < 2:
                return table[counts[-1]]
            lo, hi = counts[-2], counts[-1]
            slope = max(table[hi] - table[lo], 0.0) / (hi - lo)
            return table[hi] + slope * (q - hi)
        if below is None:
            return table[above]
        return table[below] + (table[above] - table[below]) * (q - below) / (above - below)

    def step_seconds(self, n: int, depth: int) -> float:
        """Predicted seconds of a step of this depth over n rows."""
        bucket = rows_bucket(n)
        seconds = self.verify_seconds(bucket, 1 + self.nodes(depth))
        if depth > 0:
            seconds += self.calls(depth) * self.draft_s.get(bucket, 0.0)
        seconds += self.rest_s.get((bucket, depth > 0), self.rest_s.get((bucket, depth == 0), 0.0))
        return n * seconds

    def choose(
        self,
        n: int,
        drafted: np.ndarray,
        left: np.ndarray,
        greedy: bool,
        probe_verify: Callable[[int], float],
        probe_draft: Callable[[], float],
    ) -> int:
        """The depth of the next step for rows [0, n); drafted [n]: rows the draft holds; left [n]: tokens
        each row may still generate. Also updates `wants_drafting`: whether rows that join should be drafted for."""
        if not greedy:
            # Sampling drafts at full depth every step, even for rows the draft does not hold: see the docstring.
            return self._chosen(self.max_depth)
        # Never deeper than any row can use (the target adds one token of its own): such draft passes would only
        # be verified and thrown away. Greedy output is the same at any depth.
        reach = max(int(left.max()) - 1, 0)
        any_drafted = bool(drafted.any())  # host arrays: no device read
        depth = self.max_depth if any_drafted else 0
        self.prediction = None
        if self.adaptive:
            bucket = rows_bucket(n)
            needed = self._learn(bucket, reach)
            if needed and any_drafted:
                # The costs take turns, the least timed first (ties: the shallowest), so that a machine whose
                # speed changes while they learn changes them all. A plain step times the target over one token
                # per row; a drafted step a draft pass and a pass over its tokens.
                depth_of = {1: 0} | {1 + self.nodes(d): d for d in self.learning_depths}  # tokens per row -> depth
                turns = [(len(samples), depth_of[q]) for q, samples in needed.items() if q in depth_of]
                return self._chosen(min(min(turns)[1] if turns else 1, reach))  # no turns: only the draft pass left
            if 1 in needed:
                return self._chosen(0)
            if needed:
                self._scratch(n, probe_verify, probe_draft)
            seconds = [self.step_seconds(n, d) for d in range(self.max_depth + 1)]
            actual, everyone = self.expected_tokens(n, drafted, left)
            rates = [tokens / s for tokens, s in zip(actual, seconds)]
            depth = min(max(range(len(rates)), key=rates.__getitem__) if any_drafted else 0, reach)
            self.prediction = (bucket, seconds[depth])
            best_for_all = max(t / s for t, s in zip(everyone, seconds))
            plain = everyone[0] / seconds[0]
            self.wants_drafting = best_for_all > plain * (1.0 if self.wants_drafting else HYSTERESIS)
        return self._chosen(min(depth, reach))

    def _chosen(self, depth: int) -> int:
        self.depths[depth] = self.depths.get(depth, 0) + 1
        return depth

    def observe(
        self,
        n: int,
        depth: int,
        proposed: np.ndarray,
        accepted: np.ndarray,
        seconds: tuple[float, float, float],
        draft_calls: int,
    ):
        """After a step over rows [0, n): proposed [n] the depth each row was offered (its proposal's depth),
        accepted [n] the depth it accepted; seconds = (draft, verify, rest) of the step."""
        # Levels tried: every accepted one, plus the one that failed unless the whole proposal was accepted.
        tried = np.minimum(accepted + 1, proposed)
        self.accepted[:n] += accepted
        self.tried[:n] += tried
        total_tried = float(tried.sum())
        if total_tried > 0:
            step_rate = float(accepted.sum()) / total_tried
            self.level_acceptance = (
                step_rate
                if self.level_acceptance is None
                else ((1 - SMOOTHING) * self.level_acceptance + SMOOTHING * step_rate)
            )
        bucket = rows_bucket(n)
        self._check_prediction(bucket, sum(seconds))
        draft_s, verify_s, rest_s = (s / n for s in seconds)
        learning = self.learning.get(bucket, {})
        q = 1 + self.nodes(depth)
        # What the bucket is (re)learning is the fastest of its samples so far, and what it times for the first time
        # is taken as measured; anything else moves the whole table (see the docstring).
        table = self.verify_s.setdefault(bucket, {})
        if q in learning:
            learning[q].append(verify_s)
            table[q] = min(learning[q])
        elif q not in table:
            table[q] = verify_s
        else:
            drift = SMOOTHING * (verify_s - table[q])
            for count in table:
                table[count] = max(table[count] + drift, table[count] / 2)  # one odd step cannot zero a cost
        if draft_calls > 0:
            per_call = draft_s / draft_calls
            if "draft" in learning:
                learning["draft"].append(per_call)
                self.draft_s[bucket] = min(learning["draft"])
            elif bucket not in self.draft_s:
                self.draft_s[bucket] = per_call
            else:
                self.draft_s[bucket] = _smoothed(self.draft_s[bucket], per_call)
        _average(self.rest_s, (bucket, depth > 0), rest_s)

    def _check_prediction(self, bucket: int, seconds: float) -> None:
        """Re-learn the bucket's costs when its steps keep taking longer than the cost model priced them at, so
        deliver fewer tokens per second than it promised: costs timed on odd steps, or on a machine that has
        changed since, would otherwise steer every step until the next refresh. (The tokens half of the promise
        needs no check: each row's acceptance is counted at every step.) Seconds are averaged before they are
        compared, over about SHORTFALL_STEPS steps, so that slow steps among fast ones, which the predictions
        follow on average, do not start it."""
        if self.prediction is None or self.prediction[0] != bucket:
            return
        weight = 1 / SHORTFALL_STEPS
        steps, predicted, realised = self.realised.get(bucket, (0, self.prediction[1], seconds))
        predicted = (1 - weight) * predicted + weight * self.prediction[1]
        realised = (1 - weight) * realised + weight * seconds
        steps += 1
        self.realised[bucket] = (steps, predicted, realised)
        if steps >= SHORTFALL_STEPS and predicted < SHORTFALL * realised:
            self.measured_at[bucket] = -math.inf
            del self.realised[bucket]

    def describe(self) -> dict:
        """The measured cost model and the choices made, for the job's manifest."""
        return {
            "adaptive": self.adaptive,
            "max_depth": self.max_depth,
            "level_acceptance": self.level_acceptance,
            "depth_chosen_steps": dict(sorted(self.depths.items())),
            "verify_seconds_per_row": {
                f"rows~{2**b}": {f"tokens={q}": s for q, s in sorted(t.items())}
                for b, t in sorted(self.verify_s.items())
            },
            "draft_seconds_per_row_and_call": {f"rows~{2**b}": s for b, s in sorted(self.draft_s.items())},
        }


def _smoothed(old: float, new: float) -> float:
    return (1 - SMOOTHING) * old + SMOOTHING * new


def _average(table: dict, key, value: float) -> None:
    table[key] = value if key not in table else _smoothed(table[key], value)
