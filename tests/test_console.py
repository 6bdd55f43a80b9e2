"""What a person sees while a job runs: the progress line."""

import pyarrow as pa

from pipeline.console import Progress


def _batch(rows: int, tokens_per_row: int, calls_per_row: int, markers: int = 0) -> pa.Table:
    return pa.table(
        {
            "is_end": [False] * rows + [True] * markers,
            "new_tokens": [tokens_per_row] * rows + [None] * markers,
            "target_calls": [calls_per_row] * rows + [None] * markers,
        }
    )


def test_progress_logs_rates_tau_and_eta_every_few_seconds_not_on_every_batch():
    now = [0.0]
    lines = []
    progress = Progress(shards_total=4, log=lines.append, every_s=5.0, clock=lambda: now[0])
    now[0] = 2.0
    progress.add(_batch(10, 8, 2), shards_done=0, rows_in_done_shards=0)
    assert lines == []  # under 5 s since the start: nothing yet
    now[0] = 10.0
    progress.add(_batch(10, 8, 2, markers=1), shards_done=1, rows_in_done_shards=20)
    # 20 rows in 10 s; 4 shards of 20 rows expected, 60 to go at 2 rows/s; markers are not rows
    assert lines == ["progress: 1/4 shards, 20 rows, 2.0 rows/s, 16 tokens/s, tau 4.00, ETA 30s"]
    now[0] = 12.0
    progress.add(_batch(5, 8, 2), shards_done=1, rows_in_done_shards=20)
    assert len(lines) == 1  # the next line comes 5 s after the last


def test_progress_before_any_shard_is_done_has_no_eta():
    progress = Progress(shards_total=2, log=print, clock=lambda: 4.0)
    progress.started = 0.0
    assert progress.line(0, 0) == "progress: 0/2 shards, 0 rows, 0.0 rows/s, 0 tokens/s, tau -, ETA -"


def test_heartbeat_says_what_the_job_does_after_a_silence_and_stays_quiet_while_lines_flow():
    from pipeline.console import Heartbeat

    now = [0.0]
    lines = []
    heartbeat = Heartbeat(lines.append, every_s=15.0, clock=lambda: now[0])
    heartbeat.phase("starting Ray")
    now[0] = 10.0
    heartbeat.beat()
    assert lines == []
    now[0] = 16.0
    heartbeat.beat()
    assert lines == ["... starting Ray (16s elapsed)"]
    now[0] = 20.0
    heartbeat.log("progress: a line of the job's own")
    heartbeat.phase("decoding, waiting for the next rows", lambda: "40 rows so far")
    now[0] = 34.0
    heartbeat.beat()
    assert len(lines) == 2  # 14 s since the job's own line
    now[0] = 95.0
    heartbeat.beat()
    assert lines[-1] == "... decoding, waiting for the next rows (40 rows so far, 1m35s elapsed)"


def test_heartbeat_thread_logs_while_the_job_is_silent():
    import time

    from pipeline.console import Heartbeat

    lines = []
    with Heartbeat(lines.append, every_s=0.05) as heartbeat:
        heartbeat.phase("loading models on 1 decode actor(s)")
        time.sleep(0.3)
    assert lines and all(line.startswith("... loading models on 1 decode actor(s) (") for line in lines)
