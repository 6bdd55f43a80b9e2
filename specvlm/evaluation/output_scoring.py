"""Score a job's output shard file by shard file, in parallel processes, to the numbers score_rows gives on all of
its rows at once.

A large output does not fit comfortably in one process as Python objects (a row dict per row), and its caption
metrics are seconds of CPU per thousand rows. So its files are split into chunks of consecutive files, a few per
process, and each chunk is read (only the columns scoring needs), tokenized (one tokenizer call per chunk) and
measured in a worker process (quality.measure). What comes back is small: per row its slice values and metric
contributions, per caption set its document frequencies (n-gram counts, which add up exactly). The chunk's caption
tokens wait in a temporary file for the second pass, in which each worker computes its chunk's CIDEr-D scores
with the frequencies summed over every chunk (quality.ciders_of). The parent then sorts the rows' contributions
by (shard, key) and combines them as score_rows does, so the result is score_rows's to the last bit, however many
processes ran (tests/test_output_scoring.py).
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import pickle
import tempfile
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path

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
    with tempfile.TemporaryDirectory(prefix="specvlm-score-") as folder, _executor(processes, len(chunks)) as pool:
        paths = [str(Path(folder) / f"chunk-{i:05d}.pickle") for i in range(len(chunks))]
        measured = list(pool.map(_measure_chunk, [fs] * len(chunks), chunks, [scoring] * len(chunks), paths))
        totals = Measured([])
        for piece in measured:
            totals.add(piece)
        totals_path = str(Path(folder) / "totals.pickle")
        with open(totals_path, "wb") as file:
            pickle.dump(totals, file, protocol=pickle.HIGHEST_PROTOCOL)
        for piece, ciders in zip(measured, pool.map(_cider_chunk, paths, [totals_path] * len(chunks))):
            for index, scores in ciders:
                piece.rows[index].ciders = scores
    rows = [row for piece in measured for row in piece.rows]
    return qualities(rows, scoring), len(rows)


class _InProcess(Executor):
    """One process: the chunks one after another here, without starting a worker."""

    def map(self, fn, *iterables, **_):
        return map(fn, *iterables)


def _executor(processes: int, chunks: int) -> Executor:
    if processes == 1 or chunks == 1:
        return _InProcess()
    # forkserver: workers fork from a clean server process that has imported the scoring modules once, so they
    # start fast and never inherit the parent's threads (pyarrow's pools) as fork would.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return ProcessPoolExecutor(max_workers=min(processes, chunks), mp_context=context)


def _measure_chunk(fs, files: list[str], scoring: Scoring, path: str) -> Measured:
    """The first pass over a chunk: its rows measured; their caption tokens (with the rows) left in `path`."""
    dataset = pads.dataset(files, filesystem=fs, format="parquet")
    table = dataset.to_table(columns=[c for c in COLUMNS if c in dataset.schema.names])
    measured = measure(table.to_pylist(), scoring)
    with open(path, "wb") as file:
        pickle.dump((measured.captions, measured.rows), file, protocol=pickle.HIGHEST_PROTOCOL)
    measured.captions = []
    return measured


def _cider_chunk(path: str, totals_path: str) -> list[tuple[int, tuple]]:
    """The second pass: the chunk's CIDEr-D scores, per caption row and set, with every chunk's frequencies."""
    with open(path, "rb") as file:
        captions, rows = pickle.load(file)
    return list(ciders_of(captions, rows, _totals(totals_path)))


@functools.lru_cache(maxsize=1)
def _totals(path: str) -> Measured:
    """Read once per worker process: the summed frequencies are the largest thing the workers share."""
    with open(path, "rb") as file:
        return pickle.load(file)
