"""The shard collector: rows in every arrival order, the row count on a shard's last row (or on an end marker for
a shard without rows); a shard's file appears once, complete."""

import itertools
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.schema import DECODED_SCHEMA
from pipeline.sink import FAILURE_METADATA_KEY, OutputDir, ShardCollector
from specvlm.data.error_kinds import kind_of

HASH = "0123456789abcdef"


def _row(
    shard: str,
    index: int,
    *,
    end: bool = False,
    error: str | None = None,
    tokens: int = 3,
    closes: int | None = None,
    failure: str | None = None,
) -> dict:
    row = dict.fromkeys(DECODED_SCHEMA.names)
    row.update(
        key="" if end else f"k{index}",
        shard_id=shard,
        source=f"/in/{shard}.tar",
        task="caption",
        stop_reason="error" if end else "max_tokens",
        model="target",
        draft="none",
        config_hash=HASH,
        error=error,
        new_tokens=None if end else tokens + index,
        row_index=index,
        is_end=end,
        shard_rows=closes,
        shard_error=failure,
    )
    return row


def _shard(shard: str, rows: int, failure: str | None = None) -> list[dict]:
    """The shard's rows as the reader numbers them: the last one closes the shard with its row count and failure;
    a shard without rows is closed by an end marker."""
    if rows == 0:
        return [_row(shard, 0, end=True, closes=0, failure=failure)]
    last = {"closes": rows, "failure": failure}
    return [_row(shard, i, **(last if i == rows - 1 else {})) for i in range(rows)]


def _batch(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


def _written(tmp_path, shard: str) -> list[dict] | None:
    path = tmp_path / f"{shard}.parquet"
    return pq.read_table(path).to_pylist() if path.exists() else None


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_a_shard_is_written_once_all_its_rows_arrive_in_any_order(tmp_path, order):
    items = _shard("s", 4)  # four rows, the last closing the shard: 24 arrival orders
    collector = ShardCollector(OutputDir(str(tmp_path), {}), HASH)
    for step, i in enumerate(order):
        assert _written(tmp_path, "s") is None, f"written after {step} of 4 rows"
        collector.add(_batch([items[i]]))
    rows = _written(tmp_path, "s")
    assert [r["key"] for r in rows] == ["k0", "k1", "k2", "k3"]  # every row once, in shard order
    assert [r["new_tokens"] for r in rows] == [3, 4, 5, 6] and collector.written == {"s": 4}
    assert collector.tokens == 18 and not collector.open and not collector.failed


def test_interleaved_shards_in_random_batches_each_land_complete_when_their_last_piece_arrives(tmp_path):
    pieces = _shard("a", 5) + _shard("b", 4) + _shard("c", 0) + _shard("d", 7)
    rng = random.Random(7)
    for _ in range(20):
        out = tmp_path / str(rng.random())
        rng.shuffle(pieces)
        collector = ShardCollector(OutputDir(str(out), {}), HASH)
        delivered = []
        while len(delivered) < len(pieces):
            batch = pieces[len(delivered) : len(delivered) + rng.randint(1, 4)]
            collector.add(_batch(batch))
            delivered += batch
            for shard, rows in {"a": 5, "b": 4, "c": 0, "d": 7}.items():
                complete = sum(p["shard_id"] == shard for p in delivered) == max(rows, 1)  # or its marker
                written = _written(out, shard)
                assert (written is not None) == complete, (shard, len(delivered))
                assert written is None or [r["key"] for r in written] == [f"k{i}" for i in range(rows)]
        assert collector.written == {"a": 5, "b": 4, "c": 0, "d": 7}


def test_a_row_delivered_twice_counts_once(tmp_path):
    a0, a1 = _shard("a", 2)
    collector = ShardCollector(OutputDir(str(tmp_path), {}), HASH)
    collector.add(_batch([a1]))
    collector.add(_batch([a1]))  # a retried task's output, again: still one row short
    assert _written(tmp_path, "a") is None
    collector.add(_batch([a0]))
    assert [r["key"] for r in _written(tmp_path, "a")] == ["k0", "k1"]


def test_a_shard_that_failed_keeps_its_rows_apart_and_is_not_done(tmp_path):
    output = OutputDir(str(tmp_path), {})
    collector = ShardCollector(output, HASH)
    collector.add(_batch(_shard("bad", 2, failure="cannot read webdataset shard /in/bad.tar after 2 records")))
    assert _written(tmp_path, "bad") is None and output.finished(HASH) == set()
    assert collector.failed == {"bad": "cannot read webdataset shard /in/bad.tar after 2 records"}
    partial = pq.read_table(tmp_path / "_partial" / "bad.parquet")
    assert partial["key"].to_pylist() == ["k0", "k1"]
    assert partial.schema.metadata[FAILURE_METADATA_KEY].startswith(b"cannot read")
    assert output.partial_shards() == {"bad"}

    assert collector.kept_partial == {"bad"}

    # The rerun that completes it removes the partial file.
    rerun = ShardCollector(output, HASH, output.partial_shards())
    rerun.add(_batch(_shard("bad", 3)))
    assert [r["key"] for r in _written(tmp_path, "bad")] == ["k0", "k1", "k2"] and output.partial_shards() == set()


def test_a_shard_that_failed_before_its_first_row_keeps_nothing(tmp_path):
    output = OutputDir(str(tmp_path), {})
    collector = ShardCollector(output, HASH)
    collector.add(_batch(_shard("bad", 0, failure="cannot open webdataset shard /in/bad.tar")))
    assert collector.failed == {"bad": "cannot open webdataset shard /in/bad.tar"}
    assert collector.kept_partial == set() and output.partial_shards() == set()


def test_the_failed_shards_message_says_rows_are_kept_only_where_they_were(tmp_path):
    from pipeline.job import _failed_shards_message

    output = OutputDir(str(tmp_path), {})
    collector = ShardCollector(output, HASH)
    collector.add(_batch(_shard("empty", 0, failure="cannot open webdataset shard /in/empty.tar")))
    nothing_kept = _failed_shards_message(collector.failed, collector.kept_partial, output)
    assert "empty: cannot open" in nothing_kept and "_partial" not in nothing_kept

    collector.add(_batch(_shard("cut", 2, failure="cannot read webdataset shard /in/cut.tar after 2 records")))
    some_kept = _failed_shards_message(collector.failed, collector.kept_partial, output)
    assert f"The rows 1 of them did yield are kept apart in {tmp_path}/_partial/" in some_kept


def test_a_shard_whose_file_cannot_be_written_fails_and_the_others_go_on(tmp_path, monkeypatch):
    output = OutputDir(str(tmp_path), {})
    write = output.write_shard

    def refuse_b(shard, *args):
        if shard == "b":
            raise PermissionError("read-only bucket")
        write(shard, *args)

    monkeypatch.setattr(output, "write_shard", refuse_b)
    collector = ShardCollector(output, HASH)
    collector.add(_batch(_shard("a", 1) + _shard("b", 1) + _shard("c", 1)))
    assert collector.written == {"a": 1, "c": 1}
    assert "PermissionError: read-only bucket" in collector.failed["b"]


def test_shards_still_open_when_the_stream_ends_fail_with_what_arrived(tmp_path):
    collector = ShardCollector(OutputDir(str(tmp_path), {}), HASH)
    _, a1 = _shard("a", 2)
    collector.add(_batch([a1, _row("b", 0)]))
    assert collector.open == {"a", "b"}
    collector.close()
    assert collector.failed == {
        "a": "only 1 of 2 rows came back from decoding",
        "b": "only 1 of an unknown number (its last row never came) rows came back from decoding",
    }
    assert _written(tmp_path, "a") is None and _written(tmp_path, "b") is None


def test_error_rows_are_written_with_their_kind_first():
    """Reading and preparing tag their errors; the engine's bare messages get theirs as the shard is written."""
    engine_too_long = "prompt of 600 tokens leaves no room in the model's 512 positions; shorten it"
    errors = [None, "image_unreadable: corrupt or truncated image data", engine_too_long, "decoding failed: boom"]
    rows = [_row("s", i, error=e, closes=len(errors) if i == len(errors) - 1 else None) for i, e in enumerate(errors)]
    output = OutputDir("memory://kinds", {})
    collector = ShardCollector(output, HASH)
    collector.add(_batch(rows))
    with output.fs.open(output.shard_path("s"), "rb") as f:
        written = pq.read_table(f)["error"].to_pylist()
    assert written == [
        None,
        "image_unreadable: corrupt or truncated image data",
        f"too_long: {engine_too_long}",
        "decode_failed: decoding failed: boom",
    ]
    assert [kind_of(e) for e in written[1:]] == ["image_unreadable", "too_long", "decode_failed"]
    assert kind_of("an old message without a kind") == "other"
