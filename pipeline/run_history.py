"""The runs that wrote an output folder, kept in its manifest: each rerun adds its record on top.

The rest of the manifest describes the latest run (and the output as a whole), so a rerun that finds nothing to
do would otherwise replace the record of the run that did the work with one of a few microseconds.
"""

from __future__ import annotations

import datetime
import json
import posixpath

from pipeline.sink import MANIFEST, OutputDir
from specvlm.data.retry import with_retries

RUNS = "runs"  # the manifest's key: a list of run records, the latest first


def run_record(
    started_at: datetime.datetime, wall_seconds: float, rows_written: int, shards_written: int, config_hash: str
) -> dict:
    return {
        "started_at": started_at.isoformat(),
        "wall_seconds": round(wall_seconds, 3),
        "rows_written": rows_written,
        "shards_written": shards_written,
        "config_hash": config_hash,
    }


def run_history(output: OutputDir, latest: dict) -> list[dict]:
    """`latest` on top of the runs the output's manifest already lists. A manifest from before run histories holds
    one run, described by its summary; one that cannot be read starts the history afresh (it is rewritten next)."""
    previous = _read_manifest(output)
    if RUNS in previous:
        earlier = previous[RUNS]
    elif "summary" in previous:
        summary = previous["summary"]
        earlier = [
            {
                "finished_at": previous.get("finished_at"),
                "wall_seconds": summary.get("run_seconds"),
                "rows_written": summary.get("run_rows"),
                "shards_written": summary.get("shards_written"),
                "config_hash": previous.get("config_hash"),
            }
        ]
    else:
        earlier = []
    return [latest, *earlier]


def _read_manifest(output: OutputDir) -> dict:
    path = posixpath.join(output.root, MANIFEST)

    def read() -> dict:
        output.fs.invalidate_cache()
        if not output.fs.exists(path):
            return {}
        with output.fs.open(path, "rb") as f:
            return json.loads(f.read())

    try:
        manifest = with_retries(read, output.retry)
    except ValueError:  # not JSON: a manifest damaged by hand
        return {}
    return manifest if isinstance(manifest, dict) else {}
