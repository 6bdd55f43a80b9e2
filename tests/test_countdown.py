"""The "run N/M" lines of the evaluation and benchmark commands: every run counted, the time left from the runs so
far."""

from specvlm.evaluation.countdown import RunCounter


def test_run_counter_counts_every_run_and_estimates_the_time_left_from_the_runs_so_far():
    now = [100.0]
    lines = []
    counter = RunCounter(4, lines.append, clock=lambda: now[0])
    counter.start("autoregressive on caption (COCO), batch 8")
    now[0] += 30  # the first run took 30 s
    counter.start("vlm chain γ=5 on caption (COCO), batch 8")
    now[0] += 90  # the second 90 s: 60 s a run so far
    counter.start("vlm tree depth 8 on caption (COCO), batch 8")
    now[0] += 60
    counter.start("autoregressive on vqa (VQAv2), batch 8")
    assert lines == [
        "run 1/4: autoregressive on caption (COCO), batch 8",  # nothing to go by yet
        "run 2/4: vlm chain γ=5 on caption (COCO), batch 8 (ETA 1m30s)",  # 3 runs left at 30 s
        "run 3/4: vlm tree depth 8 on caption (COCO), batch 8 (ETA 2m00s)",  # 2 left at 60 s
        "run 4/4: autoregressive on vqa (VQAv2), batch 8 (ETA 1m00s)",  # the last, at 60 s
    ]
