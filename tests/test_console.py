"""What a person sees while a job runs: the progress line."""

import pyarrow as pa

from pipeline import compiling
from pipeline.config import load_config
from pipeline.console import Progress
from pipeline.expected_rows import ExpectedRows, expected_rows
from specvlm.data.sources import list_input, read_shard
from specvlm.demo.shards import write_parquet_shards, write_webdataset_shards


def _batch(rows: int, tokens_per_row: int, calls_per_row: int, markers: int = 0) -> pa.Table:
    return pa.table(
        {
            "is_end": [False] * rows + [True] * markers,
            "new_tokens": [tokens_per_row] * rows + [None] * markers,
            "target_calls": [calls_per_row] * rows + [None] * markers,
        }
    )


def test_progress_logs_rows_of_the_rows_expected_rates_tau_and_eta_every_few_seconds_not_on_every_batch():
    now = [0.0]
    lines = []
    expected = ExpectedRows(("a", "b", "c", "d"), known=dict.fromkeys("abcd", 20), estimate=0)
    progress = Progress(shards_total=4, expected=expected, log=lines.append, every_s=5.0, clock=lambda: now[0])
    now[0] = 2.0
    progress.add(_batch(10, 8, 2), shards_done=0, counted={})
    assert lines == []  # under 5 s since the start: nothing yet
    now[0] = 10.0
    progress.add(_batch(10, 8, 2, markers=1), shards_done=1, counted={"a": 20})
    # 20 rows in 10 s; 4 shards of 20 rows expected, 60 to go at 2 rows/s; markers are not rows
    assert lines == ["progress: 1/4 shards, 20/80 rows, 2.0 rows/s, 16 tokens/s, tau 4.00, ETA 30s"]
    now[0] = 12.0
    progress.add(_batch(5, 8, 2), shards_done=1, counted={"a": 20})
    assert len(lines) == 1  # the next line comes 5 s after the last


def test_progress_counts_down_rows_while_one_big_shard_stays_open():
    """Two shards of 20,000 rows, neither done for most of the run: the time left still falls as rows come."""
    now = [0.0]
    lines = []
    expected = ExpectedRows(("big-0", "big-1"), known={}, estimate=20_000)  # estimated from the first shard
    progress = Progress(shards_total=2, expected=expected, log=lines.append, every_s=5.0, clock=lambda: now[0])
    for _ in range(4):
        now[0] += 10.0
        progress.add(_batch(1000, 4, 1), shards_done=0, counted={})
    assert lines == [
        "progress: 0/2 shards, 1000/~40000 rows, 100.0 rows/s, 400 tokens/s, tau 4.00, ETA 6m30s",
        "progress: 0/2 shards, 2000/~40000 rows, 100.0 rows/s, 400 tokens/s, tau 4.00, ETA 6m20s",
        "progress: 0/2 shards, 3000/~40000 rows, 100.0 rows/s, 400 tokens/s, tau 4.00, ETA 6m10s",
        "progress: 0/2 shards, 4000/~40000 rows, 100.0 rows/s, 400 tokens/s, tau 4.00, ETA 6m00s",
    ]
    # The first shard's closing row says it held 30,000: its count replaces the estimate, the second stays one.
    now[0] += 10.0
    progress.add(_batch(1000, 4, 1), shards_done=0, counted={"big-0": 30_000})
    assert lines[-1] == "progress: 0/2 shards, 5000/~50000 rows, 100.0 rows/s, 400 tokens/s, tau 4.00, ETA 7m30s"
    now[0] += 10.0
    progress.add(_batch(1000, 4, 1), shards_done=1, counted={"big-0": 30_000, "big-1": 14_000})
    assert lines[-1] == "progress: 1/2 shards, 6000/44000 rows, 100.0 rows/s, 400 tokens/s, tau 4.00, ETA 6m20s"


def test_progress_before_any_row_has_no_eta():
    expected = ExpectedRows(("a", "b"), known={}, estimate=16)
    progress = Progress(shards_total=2, expected=expected, log=print, clock=lambda: 4.0)
    progress.started = 0.0
    assert progress.line(0, {}) == "progress: 0/2 shards, 0/~32 rows, 0.0 rows/s, 0 tokens/s, tau -, ETA -"


def test_rows_expected_come_from_the_listing_and_parquet_footers_else_from_the_first_shard(tmp_path):
    write_parquet_shards(str(tmp_path / "parquet"), seed=1, num_shards=2, per_shard=3)
    write_webdataset_shards(str(tmp_path / "tars"), seed=1, num_shards=3, per_shard=5)
    (tmp_path / "folder").mkdir()
    for name in ("a.png", "a.txt", "b.jpg", "c.png"):
        (tmp_path / "folder" / name).write_bytes(b"x")
    counted = []

    def count(shard, limit):
        counted.append(shard.shard_id)
        return compiling.first_rows(read_shard(shard), limit)

    def rows(uri: str, *overrides: str) -> ExpectedRows:
        config = load_config("configs/demo.yaml", [f"input.uri={uri}", *overrides])
        return expected_rows(config, list_input(uri, "auto", files_per_shard=2).shards, count)

    assert rows(str(tmp_path / "parquet")).total({}) == (6, True) and counted == []  # footers: nothing read
    assert rows(str(tmp_path / "folder")).total({}) == (3, True)  # images, not their captions
    tars = rows(str(tmp_path / "tars"))
    assert tars.total({}) == (15, False) and counted == ["00000"]  # the first tar counted, the others like it
    assert tars.total({"00000": 5, "00001": 5, "00002": 2}) == (12, True)
    prompts = rows(str(tmp_path / "parquet"), "task.prompts={short: 'Describe.', long: 'Describe in detail.'}")
    assert prompts.total({}) == (12, True)  # a row per prompt


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


def test_progress_whose_estimate_fell_short_says_so_and_gives_no_eta():
    """A tar counted up to the limit gives a lower bound: once the rows pass it, the total is not known, and the
    line must not count down to a time left of 0 s while rows keep coming."""
    now = [0.0]
    lines = []
    expected = ExpectedRows(("big",), known={}, estimate=1_000, at_least=True)
    progress = Progress(shards_total=1, expected=expected, log=lines.append, every_s=5.0, clock=lambda: now[0])
    for _ in range(2):
        now[0] += 10.0
        progress.add(_batch(800, 4, 1), shards_done=0, counted={})
    assert lines == [
        "progress: 0/1 shards, 800/>=1000 rows, 80.0 rows/s, 320 tokens/s, tau 4.00, ETA 2s",
        "progress: 0/1 shards, 1600/>=1600 rows, 80.0 rows/s, 320 tokens/s, tau 4.00, ETA -",
    ]
    now[0] += 10.0
    progress.add(_batch(400, 4, 1), shards_done=1, counted={"big": 2_000})
    assert lines[-1] == "progress: 1/1 shards, 2000/2000 rows, 66.7 rows/s, 267 tokens/s, tau 4.00, ETA 0s"


def test_a_first_shard_counted_to_the_limit_makes_the_estimate_a_lower_bound(tmp_path):
    write_webdataset_shards(str(tmp_path / "tars"), seed=1, num_shards=2, per_shard=3)
    config = load_config("configs/demo.yaml", [f"input.uri={tmp_path / 'tars'}"])
    shards = list_input(str(tmp_path / "tars"), "auto", files_per_shard=2).shards
    assert expected_rows(config, shards, lambda shard, limit: limit).at_least
    assert not expected_rows(config, shards, lambda shard, limit: limit - 1).at_least
