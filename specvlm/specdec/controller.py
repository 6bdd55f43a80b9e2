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
estimate than their median, which two slow steps out of three decide. Where the draft holds no row (so no
drafted step is possible: drafting was off when they joined), plain steps time the target, and drafting is priced
from the nearest row count that learned it from real steps, scaled by the two counts' plain steps (the choice
rests on ratios of costs, which change slowly with the rows). Passes that commit nothing, timed instead, cost a
whole step each: a batch that drains through 4, 2 and 1 rows paid 6-9 of them per row count, 5-8% of a run of
the demo target at cap 8 with a draft that is never right. A count priced so re-learns from real steps as soon
as the draft holds a row there. While the draft holds no row, every step is plain whatever the costs, and whether
rows that join should be drafted is priced again only when the row count changes or PROBE_EVERY steps have
passed (and at every step while its count learns): pricing every step cost 2% of the demo target's steps at 8
rows.
Past one token, verification costs grow about linearly with the tokens per row, so other counts are interpolated
between measured ones, or extrapolated along the last two. The deeper step is what makes that line true: the step
from 1 to 2 tokens is often steeper than the ones after it (a one-token pass takes a faster path), and a line
through those two alone would overprice every deeper window. A step's draft phase is priced the same way, by the
passes it makes, measured whole: it costs more than that many lone passes, because its first pass also feeds the
tokens the target committed since the last proposal, and proposing has a set-up of its own (on the demo family, a
phase of one pass took 1.4x the cheapest pass at 8 rows and 2.6x at 24). One price per pass charged shallow depths
too little and deep ones too much, and steered most steps to depth 1 where plain decoding, or a deeper draft,
was faster.

Every step then refines what it used: a cost is the fastest of the steps that timed it since the bucket learned,
and a count timed for the first time (a depth deeper than the learning steps) is taken as measured. Fastest, not
an average, for the same reason as above, and because the choice compares costs with each other: a machine that
is busier slows every depth alike and leaves the best one where it was, while an average of disturbed steps
would price only the depth in use at the busy machine's rate and make the depths not in use look cheap.
A cost that really rises (the machine turned from bound by reading weights, where deep windows cost little more
than one token, to bound by arithmetic, where they cost in proportion; outputs grown long enough that attention
reads much more cache) is caught by checking the model against what the steps deliver: when even the fastest of
the last SHORTFALL_STEPS steps of a bucket took so much longer than predicted that it realised less than SHORTFALL
of the tokens per second the model promised, the bucket re-learns its costs instead of waiting for the refresh.
Noise only adds time, so one undisturbed step among them is enough to keep a correct model.
On a machine so busy that none is, a re-learning is wasted; so a check may start one only RELEARN_SPACING
learning rounds' worth of steps after the last, which keeps learning a small share of the steps whatever the load.

Fastest-of costs can only be priced too high, never too low (noise adds time; a cost that truly rose is caught
by that check), and a depth priced too high is never chosen, so never timed again. So every PROBE_EVERY steps
the controller takes instead the most promising depth deeper than the best, or the most promising shallower one,
one side and then the other: each is the cheapest probe on its side (near the best, usually a neighbour, whose
rate differs little: the probe costs a fraction of a step), and where it was priced too high it is found out and
taken. Both sides, not just the neighbours: with a draft as costly as the target, depth 1 can lose to plain
decoding while deep drafts win, and a plain decoder that only ever tried depth 1 would never find them.

A step of depth d does all the work of a step of depth d - 1 and more, so a deeper step is never priced below a
shallower one: with acceptance near zero, a plain step timed on a disturbed moment cannot make drafting look
cheaper than not drafting. And drafting costs are only learned while they could pay: when even free drafting, at
the acceptance seen so far, would commit less than HYSTERESIS times the tokens of plain decoding, the controller
decodes plain and times nothing else (a probe of a draft that is never right costs a whole step and can win
nothing). The acceptance of all rows is counted from the levels they tried, starting from PRIOR_ACCEPTANCE with
PRIOR_WEIGHT levels' worth of weight, so that one rejected first proposal does not condemn a good draft.
Tables are indexed by a bucket of the row count, so they follow the load and the machine, and hold seconds per
row, because within a bucket a pass costs about in proportion to its rows (a batch that drains stays priced).

Greedy output does not depend on the depths chosen (every committed token is the target's argmax). Sampled
output does: rejection sampling's random choices depend on what was drafted. So under sampling the depth is
fixed at the draft's full depth, which keeps a sampled request's output a function of its seed alone, whatever
its batch and whenever it joined.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable

import numpy as np

REFRESH_S = 60.0  # seconds between re-measurements of a bucket: a cost measured badly once cannot stick, and
# the learning steps stay a small share of the time
LEARNING_SAMPLES = 3  # steps that time each cost while a bucket learns: the fastest counts (see the docstring)
SHORTFALL = 0.75  # predicted over realised seconds of the fastest recent step, below which a bucket re-learns
SHORTFALL_STEPS = 8  # recent steps that check compares: on two cores at load 6 most steps are disturbed, and the
# chance that 8 in a row all are is small enough; more would delay noticing a real change by as many steps
RELEARN_SPACING = 20  # a re-learning started by the check waits this many times the steps a learning takes: at
# most about 1/20 of the steps learn, so that on a machine too busy to check the model learning costs under 5%
PROBE_EVERY = 16  # steps between probes of a depth other than the best: the most promising one on a side is
# usually a neighbour, whose rate differs little, and one step in 16 keeps the cost near 2% even for a depth 30%
# slower (plain decoding beside a draft that is rarely right); a depth priced too high is found within a second
# on a GPU (16 steps of 10-20 ms), within a few seconds on the demo's CPU
PRIOR_ACCEPTANCE = 0.5  # the level acceptance assumed before any row tried a level: neither condemns nor trusts
PRIOR_WEIGHT = 4.0  # levels' worth of evidence that prior counts for (for the rows together, and for one row
# against the acceptance of all rows): a few rejected levels move an estimate, one does not settle it
HYSTERESIS = 1.03  # drafting for rows that join must promise this much over plain decoding; also the least gain
# that free drafting must promise before drafting costs are learned at all


def rows_bucket(n: int) -> int:
    """Row counts whose costs are kept together: an octave apart (1, 2, 4, 8, ...). The choice rests on ratios
    of costs at one row count (a deeper pass over a one-token pass, a draft pass over a target pass), which
    change slowly with the rows; finer buckets would only multiply the learning steps of a batch that drains."""
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
        self.draft_s: dict[int, dict[int, float]] = {}  # rows bucket -> draft passes -> a step's draft phase
        self.borrowed: set[int] = set()  # rows buckets whose drafting costs another bucket's priced, for now
        self.rest_s: dict[tuple[int, bool], float] = {}  # (rows bucket, drafting) -> a step's bookkeeping
        self.measured_at: dict[int, float] = {}  # rows bucket -> when its costs were last (re)learned
        # rows bucket -> what its steps are timing while it learns (token counts, "draft") -> the seconds per row
        # measured so far; a bucket's entry goes when every cost has LEARNING_SAMPLES of them
        self.learning: dict[int, dict[int | str, list[float]]] = {}
        # rows bucket -> (steps since it learned, realised over predicted seconds of its last SHORTFALL_STEPS steps)
        self.realised: dict[int, tuple[int, collections.deque[float]]] = {}
        self.prediction: tuple[int, float] | None = None  # (rows bucket, seconds) the chosen step was priced at
        # Levels accepted out of levels tried, all rows together, since the decoder started.
        self.all_accepted = 0.0
        self.all_tried = 0.0
        # Per row, on the host (the controller never reads the device): levels accepted out of levels tried.
        self.accepted = np.zeros(rows)
        self.tried = np.zeros(rows)
        self.depths: dict[int, int] = {}  # how often each depth was chosen
        self.until_probe = PROBE_EVERY  # steps before the next probe of a depth other than the best
        self.undrafted: tuple[int, int] | None = None  # while the draft holds no row: (rows, plain steps left
        # before `wants_drafting` is priced again)
        self.probe_deeper = False  # the side of the last one
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

    @property
    def level_acceptance(self) -> float:
        """The level acceptance of all rows together, shrunk towards PRIOR_ACCEPTANCE while few levels were tried."""
        return (self.all_accepted + PRIOR_WEIGHT * PRIOR_ACCEPTANCE) / (self.all_tried + PRIOR_WEIGHT)

    def expected_tokens(self, n: int, drafted: np.ndarray, left: np.ndarray) -> tuple[list[float], list[float]]:
        """Expected tokens committed by a step of each depth 0..max_depth, summed over rows [0, n): as the rows
        are (only `drafted` rows can accept drafts), and were the draft to hold every row."""
        prior = self.level_acceptance
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
            # Every cost is the fastest since the bucket learned: the old ones go, and the deeper counts, timed on
            # the old costs, are timed again by the deeper steps chosen from the new ones.
            self.verify_s.pop(bucket, None)
            self.draft_s.pop(bucket, None)
            self.borrowed.discard(bucket)
            for drafting in (False, True):
                self.rest_s.pop((bucket, drafting), None)
        learning = self.learning.get(bucket, {})
        for d in self.learning_depths:
            if d > reach:
                learning.pop(1 + self.nodes(d), None)
        needed = {item: samples for item, samples in learning.items() if len(samples) < LEARNING_SAMPLES}
        if bucket in self.learning and not needed:
            del self.learning[bucket]
            self.realised.pop(bucket, None)  # the prediction is checked afresh against the new costs
        return needed

    def _borrow(self, bucket: int) -> None:
        """Price drafting at a bucket the draft holds no row of, from the nearest bucket that learned it from real
        steps, scaled by their plain steps (see the docstring); with none, drafting's verify windows cost what a
        plain step does and its draft passes nothing, until rows that join are drafted and time them."""
        del self.learning[bucket]
        self.realised.pop(bucket, None)
        self.borrowed.add(bucket)
        learned = [b for b in self.draft_s if b not in self.borrowed and 1 in self.verify_s.get(b, {})]
        if not learned:
            return
        source = min(learned, key=lambda b: (abs(b - bucket), -b))  # ties: the larger count, measured on more rows
        scale = self.verify_s[bucket][1] / self.verify_s[source][1]
        table = self.verify_s[bucket]
        for q, s in self.verify_s[source].items():
            table.setdefault(q, s * scale)
        self.draft_s[bucket] = {calls: s * scale for calls, s in self.draft_s[source].items()}

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

    def draft_seconds(self, bucket: int, calls: int) -> float:
        """A draft phase of `calls` passes, per row: measured, or along the line through the nearest measured
        counts (interpolated, or extrapolated from the two at that end), or in proportion to the one measured."""
        table = self.draft_s.get(bucket)
        if not table:
            return 0.0
        if calls in table:
            return table[calls]
        counts = sorted(table)
        if len(counts) == 1:
            return table[counts[0]] * calls / counts[0]
        below, above = [k for k in counts if k < calls], [k for k in counts if k > calls]
        if below and above:
            lo, hi = below[-1], above[0]
        else:
            lo, hi = counts[:2] if above else counts[-2:]
        slope = max(table[hi] - table[lo], 0.0) / (hi - lo)
        return max(table[lo] + slope * (calls - lo), 0.0)

    def step_seconds(self, n: int) -> list[float]:
        """Predicted seconds of a step of each depth 0..max_depth over n rows, never less than a shallower one's
        (see the docstring)."""
        bucket = rows_bucket(n)
        seconds = []
        for depth in range(self.max_depth + 1):
            s = self.verify_seconds(bucket, 1 + self.nodes(depth))
            if depth > 0:
                s += self.draft_seconds(bucket, self.calls(depth))
            s += self.rest_s.get((bucket, depth > 0), self.rest_s.get((bucket, depth == 0), 0.0))
            seconds.append(max([n * s, *seconds[-1:]]))
        return seconds

    def choose(self, n: int, drafted: np.ndarray, left: np.ndarray, greedy: bool) -> int:
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
        bucket = rows_bucket(n)
        if self.adaptive and not any_drafted:
            rows, left_steps = self.undrafted or (None, 0)
            if rows == n and left_steps > 0 and bucket not in self.learning:
                self.undrafted = (n, left_steps - 1)
                return self._chosen(0)
            self.undrafted = (n, PROBE_EVERY - 1)
        else:
            self.undrafted = None
        if self.adaptive:
            actual, everyone = self.expected_tokens(n, drafted, left)
            if max(everyone) < HYSTERESIS * everyone[0]:
                # Even free drafting would not pay at this acceptance: nothing worth timing (see the docstring).
                self.wants_drafting = False
                return self._chosen(0)
            if any_drafted and bucket in self.borrowed:
                self.measured_at[bucket] = -math.inf  # drafted steps are possible now: they price it (docstring)
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
                self._borrow(bucket)
            seconds = self.step_seconds(n)
            rates = [tokens / s for tokens, s in zip(actual, seconds)]
            depth = min(max(range(len(rates)), key=rates.__getitem__) if any_drafted else 0, reach)
            if any_drafted:
                depth = self._probe_runner_up(depth, rates[: reach + 1])
            self.prediction = (bucket, seconds[depth])
            best_for_all = max(t / s for t, s in zip(everyone, seconds))
            plain = everyone[0] / seconds[0]
            self.wants_drafting = best_for_all > plain * (1.0 if self.wants_drafting else HYSTERESIS)
        return self._chosen(min(depth, reach))

    def _probe_runner_up(self, best: int, rates: list[float]) -> int:
        """Every PROBE_EVERY steps, instead of the best depth, the most promising one deeper than it, or the most
        promising one shallower, taking turns (one side only where the other has none): the way a depth that was
        priced too high gets timed again (see the docstring). rates: predicted tokens/s of the depths rows can use."""
        self.until_probe -= 1
        if self.until_probe > 0:
            return best
        self.until_probe = PROBE_EVERY
        self.probe_deeper = not self.probe_deeper
        deeper, shallower = range(best + 1, len(rates)), range(best)
        side = (deeper or shallower) if self.probe_deeper else (shallower or deeper)
        return max(side, key=rates.__getitem__, default=best)

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
        self.all_accepted += float(accepted.sum())
        self.all_tried += float(tried.sum())
        bucket = rows_bucket(n)
        self._check_prediction(bucket, sum(seconds))
        draft_s, verify_s, rest_s = (s / n for s in seconds)
        learning = self.learning.get(bucket, {})
        q = 1 + self.nodes(depth)
        # Every cost is the fastest of its samples since the bucket (re)learned (see the docstring).
        if q in learning:
            learning[q].append(verify_s)
        _fastest(self.verify_s.setdefault(bucket, {}), q, verify_s)
        if draft_calls > 0:
            if "draft" in learning:
                learning["draft"].append(draft_s)
            _fastest(self.draft_s.setdefault(bucket, {}), draft_calls, draft_s)
        _fastest(self.rest_s, (bucket, depth > 0), rest_s)

    def _check_prediction(self, bucket: int, seconds: float) -> None:
        """Re-learn the bucket's costs when even the fastest of its recent steps took much longer than the cost
        model priced it at, so delivered fewer tokens per second than it promised: costs that have risen since
        they were timed would otherwise steer every step until the next refresh (see the docstring). (The tokens
        half of the promise needs no check: each row's acceptance is counted at every step.)"""
        if self.prediction is None or self.prediction[0] != bucket:
            return
        steps, ratios = self.realised.get(bucket, (0, collections.deque(maxlen=SHORTFALL_STEPS)))
        ratios.append(seconds / self.prediction[1])
        steps += 1
        self.realised[bucket] = (steps, ratios)
        spacing = RELEARN_SPACING * LEARNING_SAMPLES * (1 + len(self.learning_depths))  # steps of a learning round
        if steps >= spacing and len(ratios) == SHORTFALL_STEPS and SHORTFALL * min(ratios) > 1:
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
            "draft_seconds_per_row": {
                f"rows~{2**b}": {f"calls={k}": s for k, s in sorted(t.items())} for b, t in sorted(self.draft_s.items())
            },
        }


def _fastest(table: dict, key, seconds: float) -> None:
    table[key] = min(table.get(key, seconds), seconds)
