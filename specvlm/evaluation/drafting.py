"""How much a strategy drafted, and why it stepped aside where it did not, for the evaluation report.

An adaptive strategy (draft.adaptive, the default under greedy decoding) drafts each step only as deep as the
depth controller (specvlm/specdec/controller.py) expects to pay, down to not at all: its tau and acceptance then
describe the steps it chose to draft, and say little about the draft itself. So the report keeps the steps apart:
a step that verified no draft token (nodes_per_step 0) was not drafted, and accepted nothing because nothing was
proposed. The reason for stepping aside is the controller's: the level acceptance and the costs it measured,
which each run's manifest holds under operating_points (per decode actor, as of its last report).
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field

from fsspec.core import url_to_fs


@dataclass
class DraftedSteps:
    drafted: int = 0  # steps that verified at least one draft token
    undrafted: int = 0  # plain steps: the target alone, one token
    accepted: list[int] = field(default_factory=list)  # draft tokens accepted at each drafted step
    longest: int = 0  # steps of the longest row: the engine took at least as many

    @property
    def drafted_fraction(self) -> float:
        steps = self.drafted + self.undrafted
        return self.drafted / steps if steps else 0.0


def drafted_steps(rows: list[dict]) -> DraftedSteps:
    """The steps of decoded rows, drafted and not. Outputs written before nodes_per_step existed count every step
    as drafted (they cannot tell)."""
    steps = DraftedSteps()
    for row in rows:
        accepted = row["accepted_per_step"] or []
        nodes = row.get("nodes_per_step") or [1] * len(accepted)
        steps.longest = max(steps.longest, len(accepted))
        for n, a in zip(nodes, accepted):
            if n > 0:
                steps.drafted += 1
                steps.accepted.append(a)
            else:
                steps.undrafted += 1
    return steps


def what_ran(kind: str, mode: str, depth: int, adaptive: bool) -> str:
    """A strategy's draft as it ran: "no draft", "chain, adaptive γ ≤ 5", "tree, fixed depth 8"."""
    if kind == "none":
        return "no draft"
    size = "γ" if mode == "chain" else "depth"
    return f"{mode}, adaptive {size} ≤ {depth}" if adaptive else f"{mode}, fixed {size} {depth}"


def controllers(uri: str, storage_options: dict | None = None) -> list[dict]:
    """The depth controller of each decode actor of the job at `uri`, from its manifest's operating points (none
    when the manifest is missing, or the last run had nothing to decode)."""
    fs, path = url_to_fs(posixpath.join(uri, "_manifest.json"), **(storage_options or {}))
    if not fs.exists(path):
        return []
    points = json.loads(fs.cat_file(path)).get("operating_points") or {}
    return [p["controller"] for p in points.values() if p.get("controller")]


def stepping_aside(steps: DraftedSteps, controller_views: list[dict]) -> str:
    """Why a strategy drafted on fewer than every step, in a sentence or two, from what its controllers saw."""
    undrafted = f"drafted on {steps.drafted_fraction:.0%} of its rows' {steps.drafted + steps.undrafted} steps"
    adaptive = [c for c in controller_views if c.get("adaptive")]
    if not controller_views:
        return f"{undrafted}; the run's manifest holds no controller report to say why."
    if not adaptive:
        return (
            f"{undrafted}, at a fixed depth: the undrafted steps are rows the draft could not take (its own "
            "prefill failed) or that joined with too little left to generate to repay the draft's prefill."
        )
    parts = [undrafted + ". The depth controller chose each step's depth from the costs it measured:"]
    for view in adaptive:
        parts.append(_controller_sentence(view))
    reported = max(sum((v.get("depth_chosen_steps") or {}).values()) for v in adaptive)
    if reported < steps.longest:
        # A decode actor reports its operating point now and then during the run, not at its end.
        parts.append(
            f"That report came after {reported} engine steps, fewer than its longest row took ({steps.longest}): "
            "the choices made after it are not in the manifest. While it learns the costs of a row count, the "
            "controller takes turns between plain and drafted steps, so a job of few steps drafts on about two "
            "in three whatever the draft."
        )
    return " ".join(parts)


def _controller_sentence(view: dict) -> str:
    chosen = view.get("depth_chosen_steps") or {}
    total = sum(chosen.values())
    shares = ", ".join(f"depth {d} on {n / total:.0%}" for d, n in chosen.items()) if total else "no steps yet"
    acceptance = view.get("level_acceptance")
    seen = f"level acceptance {acceptance:.2f}" if acceptance is not None else "no acceptance measured yet"
    costs = []
    for bucket, by_tokens in (view.get("verify_seconds_per_row") or {}).items():
        one = by_tokens.get("tokens=1")
        deepest = max(by_tokens, key=lambda t: int(t.split("=")[1]))
        phases = (view.get("draft_seconds_per_row") or {}).get(bucket) or {}
        if one and deepest != "tokens=1":
            cost = f"a target pass over {deepest.split('=')[1]} tokens cost {by_tokens[deepest] / one:.2f}x one over 1"
            if phases:
                passes = max(int(calls.split("=")[1]) for calls in phases)
                cost += f", a draft phase of {passes} passes {phases[f'calls={passes}'] / one:.2f}x"
            costs.append(f"{bucket.replace('~', ' ~')}: {cost}")
    measured = "; ".join(costs) if costs else "no drafted pass timed"
    return (
        f"{shares} (of {total} steps when last reported); {seen}; {measured}. Drafting d tokens pays when its "
        "expected tokens, 1 + a + ... + a^d, grow faster than its cost over a plain step's."
    )
