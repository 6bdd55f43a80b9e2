"""Score a job's output shard file by shard file, in parallel processes, to the numbers score_rows gives on all of
its rows at once.

A large output does not fit comfortably in one process as Python objects (a row dict per row), and its caption
metrics are seconds of CPU per thousand rows. So its files are split into chunks of consecutive files, a few per
process, and each chunk is read (only the columns scoring needs), tokenized (one tokenizer call per chunk) and
measured in a worker process (quality.measure). What comes back is small: per row its slice values and metric
contributions, per caption set its document frequencies (n-gram counts, which add up exactly). Each worker keeps
its chunks' counted texts (a coco.Corpus per chunk) for the second pass, in which it computes their CIDEr-D
scores with the frequencies summed over every chunk (quality.ciders_of): the texts are counted once, and what
crosses between processes is the rows' contributions and the frequencies. Chunks go to whichever worker is free,
so a slow chunk does not hold the others up. The parent then sorts the rows' contributions by (shard, key) and
combines them as score_rows does, so the result is score_rows's to the last bit, however many processes ran
(tests/test_output_scoring.py).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import pickle
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait

import pyarrow.dataset as pads
from fsspec.core import url_to_fs

from specvlm.evaluation.quality import Measured, Scoring, ciders_of, measure, qualities

COLUMNS = ("shard_id", "key", "task", "text", "prompt", "reference", "references", "meta", "error")
CHUNKS_PER_PROCESS = 4  # more chunks than processes, so that one slow chunk does not leave the others idle


def default_processes() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def score_output(
    uri: str, scoring: Scoring, *, processes: int | None = None, storage_options: dict | None = None
) -> tuple[dict[str, dict], int]:
    """(task -> its quality, rows scored) of the job output at `uri` (its *.parquet; `_manifest.json` and
    `_staging/` are skipped by their `_`), in up to `processes` worker processes (default: the CPUs)."""
    fs, root = url_to_fs(uri, **(storage_options or {}))
    fs.invalidate_cache()
    files = sorted(pads.dataset(root, filesystem=fs, format="parquet").files)
    if not files:
        return {}, 0
    processes = max(1, processes or default_processes())
    per_chunk = math.ceil(len(files) / (processes * CHUNKS_PER_PROCESS))
    chunks = [files[i : i + per_chunk] for i in range(0, len(files), per_chunk)]
    workers = min(processes, len(chunks))
    measured = _in_process(fs, chunks, scoring) if workers == 1 else _in_workers(fs, chunks, scoring, workers)
    rows = [row for piece in measured for row in piece.rows]
    return qualities(rows, scoring), len(rows)


def _in_process(fs, chunks: list[list[str]], scoring: Scoring) -> list[Measured]:
    pieces = [_measure_files(fs, files, scoring) for files in chunks]
    totals = _totals(pieces)
    for piece in pieces:
        _set_ciders(piece, ciders_of(piece, totals))
    return pieces


def _in_workers(fs, chunks: list[list[str]], scoring: Scoring, workers: int) -> list[Measured]:
    """Both passes in `workers` processes: chunks handed to whichever is free, each chunk's CIDEr-D pass in the
    process that measured it (which holds its corpus)."""
    # forkserver: workers fork from a clean server process that has imported the scoring modules once, so they
    # start fast and never inherit the parent's threads (pyarrow's pools) as fork would.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    pipes, processes = [], []
    try:
        for _ in range(workers):
            ours, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(theirs, fs, scoring), daemon=True)
            process.start()
            theirs.close()
            pipes.append(ours)
            processes.append(process)
        pieces: list[Measured | None] = [None] * len(chunks)
        waiting = list(enumerate(chunks))
        busy = {}  # pipe -> the chunk it measures
        for pipe in pipes:
            if waiting:
                busy[pipe] = _send(pipe, waiting.pop(0))
        while busy:
            for pipe in wait(list(busy)):
                pieces[busy.pop(pipe)] = _receive(pipe, processes[pipes.index(pipe)])
                if waiting:
                    busy[pipe] = _send(pipe, waiting.pop(0))
        totals = pickle.dumps(_totals(pieces), protocol=pickle.HIGHEST_PROTOCOL)
        for pipe in pipes:
            pipe.send_bytes(totals)
        for pipe, process in zip(pipes, processes):
            for index, ciders in _receive(pipe, process):
                _set_ciders(pieces[index], ciders)
        return pieces
    finally:
        for pipe in pipes:
            pipe.close()
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()


def _send(pipe: Connection, chunk: tuple[int, list[str]]) -> int:
    pipe.send(chunk)
    return chunk[0]


def _receive(pipe: Connection, process):
    try:
        kind, value = pipe.recv()
    except (EOFError, ConnectionError):
        process.join(timeout=5)
        raise RuntimeError(
            f"a scoring worker process died (exit code {process.exitcode}); if the machine ran out of memory, "
            "score with fewer processes (--processes)"
        ) from None
    if kind == "error":
        raise value
    return value


def _serve(pipe: Connection, fs, scoring: Scoring) -> None:
    """A worker: measure the chunks it is sent until the summed totals come, then send its chunks' CIDEr-D."""
    pieces: dict[int, Measured] = {}
    try:
        while True:
            message = pipe.recv_bytes()
            request = pickle.loads(message)
            if isinstance(request, Measured):
                pipe.send(("ciders", [(i, list(ciders_of(piece, request))) for i, piece in pieces.items()]))
                return
            index, files = request
            pieces[index] = _measure_files(fs, files, scoring)
            pipe.send(("measured", pieces[index].totals()))
            pieces[index].frequencies = {}  # sent; only the corpus and rows are needed for the second pass
    except BaseException as exc:  # the parent re-raises it: a worker has no one else to tell
        try:
            pipe.send(("error", exc))
        except Exception:  # an exception that does not pickle: its text
            pipe.send(("error", RuntimeError(f"scoring a chunk failed: {exc!r}")))


def _measure_files(fs, files: list[str], scoring: Scoring) -> Measured:
    """The first pass over a chunk: its rows measured, their caption texts counted."""
    dataset = pads.dataset(files, filesystem=fs, format="parquet")
    table = dataset.to_table(columns=[c for c in COLUMNS if c in dataset.schema.names])
    return measure(table.to_pylist(), scoring)


def _totals(pieces: Sequence[Measured]) -> Measured:
    totals = Measured([])
    for piece in pieces:
        totals.add(piece)
    return totals


def _set_ciders(piece: Measured, ciders) -> None:
    for index, scores in ciders:
        piece.rows[index].ciders = scores
