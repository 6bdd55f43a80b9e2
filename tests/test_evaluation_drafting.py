"""The evaluation report keeps drafted steps apart from undrafted ones, labels a strategy by what it ran, and says
why an adaptive strategy stepped aside, from the controller's report in the run's manifest."""

import json

import pyarrow as pa
import pyarrow.parquet as pq

from specvlm.evaluation.drafting import drafted_steps, what_ran
from specvlm.evaluation.report import Run, build_report, write_report

CONTROLLER = {
    "adaptive": True,
    "max_depth": 5,
    "level_acceptance": 0.8,
    "depth_chosen_steps": {"0": 6, "5": 2},
    "verify_seconds_per_row": {"rows~8": {"tokens=1": 0.010, "tokens=6": 0.040}},
    "draft_seconds_per_row": {"rows~8": {"calls=5": 0.02}},
}


def _run_output(path, accepted: list[int], nodes: list[int], controller: dict | None) -> str:
    row = {
        "shard_id": "s0",
        "key": "k0",
        "task": "caption",
        "text": "a red square",
        "output_ids": [1, 2, 3],
        "reference": "a red square",
        "references": ["a red square"],
        "meta": "{}",
        "error": None,
        "new_tokens": len(accepted) + sum(accepted),
        "target_calls": len(accepted),
        "accepted_tokens": sum(accepted),
        "proposed_tokens": sum(nodes),
        "mbsu": 1.0,
        "latency_s": 1.0,
        "accepted_per_step": accepted,
        "nodes_per_step": nodes,
    }
    path.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([row]), path / "s0.parquet")
    if controller is not None:
        points = {"vm:1": {"actor": "vm:1", "controller": controller}}
        (path / "_manifest.json").write_text(json.dumps({"operating_points": points}))
    return str(path)


def test_undrafted_steps_are_no_accepted_lengths():
    steps = drafted_steps(
        [
            {"accepted_per_step": [5, 0, 0, 3], "nodes_per_step": [5, 0, 0, 5]},  # two plain steps between
            {"accepted_per_step": [0, 2], "nodes_per_step": [5, 5]},  # a drafted step that accepted nothing
        ]
    )
    assert (steps.drafted, steps.undrafted, steps.accepted) == (4, 2, [5, 3, 0, 2])
    assert steps.drafted_fraction == 4 / 6


def test_a_strategy_is_labelled_by_what_it_ran():
    assert what_ran("vlm", "chain", 5, adaptive=True) == "chain, adaptive γ ≤ 5"
    assert what_ran("vlm", "tree", 8, adaptive=False) == "tree, fixed depth 8"
    assert what_ran("none", "chain", 5, adaptive=True) == "no draft"


def test_report_says_why_an_adaptive_strategy_stepped_aside(tmp_path):
    runs = [
        Run("caption", "autoregressive", 8, _run_output(tmp_path / "ar", [0] * 8, [0] * 8, None), ran="no draft"),
        Run(
            "caption",
            "vlm chain γ=5",
            8,
            # 8 steps: two drafted (5 and 3 accepted), six of the target alone.
            _run_output(tmp_path / "chain", [5, 0, 0, 0, 3, 0, 0, 0], [5, 0, 0, 0, 5, 0, 0, 0], CONTROLLER),
            ran="chain, adaptive γ ≤ 5",
        ),
        Run(
            "caption",
            "vlm tree depth 8",
            8,
            _run_output(tmp_path / "tree", [4, 4, 3, 0], [9, 9, 9, 9], {**CONTROLLER, "adaptive": False}),
            ran="tree, fixed depth 8",
        ),
    ]
    report = build_report(runs, meteor=False)
    _, chain, tree = report.results
    assert chain.label == "vlm chain γ=5 (chain, adaptive γ ≤ 5)"
    assert (chain.steps.drafted, chain.steps.undrafted, chain.steps.accepted) == (2, 6, [5, 3])
    assert chain.stepped_aside.startswith("drafted on 25% of its rows' 8 steps. The depth controller chose")
    why = chain.stepped_aside
    assert "depth 0 on 75%, depth 5 on 25% (of 8 steps when last reported); level acceptance 0.80" in why
    assert "a target pass over 6 tokens cost 4.00x one over 1, a draft phase of 5 passes 2.00x" in why
    assert "not in the manifest" not in why  # its report counted all 8 steps
    assert tree.stepped_aside is None and tree.steps.accepted == [4, 4, 3, 0]  # drafted every step

    text = write_report(report, tmp_path / "report").read_text()
    # τ and acceptance count every step; `drafted` says how many there were to count.
    row = "| caption | 8 | vlm chain γ=5 | chain, adaptive γ ≤ 5 | 1 | 100% | yes | - | - | 1.00x | 25% | 2.00 | 0.80 |"
    assert row in text
    assert "## Where a strategy stepped aside" in text
    assert "- caption, batch 8, vlm chain γ=5 (chain, adaptive γ ≤ 5): drafted on 25% of its rows' 8 steps." in text
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert [(s["drafted_steps"], s["undrafted_steps"]) for s in metrics["strategies"]] == [(0, 8), (2, 6), (4, 0)]


def test_a_controller_report_from_early_in_the_run_is_said_to_be_early(tmp_path):
    # Decode actors report now and then: this one after the engine's first step, a plain one.
    early = {**CONTROLLER, "depth_chosen_steps": {"0": 1}}
    runs = [
        Run("caption", "autoregressive", 8, _run_output(tmp_path / "ar", [0] * 6, [0] * 6, None)),
        Run("caption", "chain", 8, _run_output(tmp_path / "chain", [0, 2, 2, 0, 2, 0], [0, 5, 5, 0, 5, 0], early)),
    ]
    why = build_report(runs, meteor=False).results[1].stepped_aside
    assert why.startswith("drafted on 50% of its rows' 6 steps.")
    assert "That report came after 1 engine steps, fewer than its longest row took (6)" in why
