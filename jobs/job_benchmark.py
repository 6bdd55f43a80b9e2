"""Throughput of whole jobs, as a user runs them: the default caption job against the best plain-decoding job
and against the script a user would write instead, on the same held-out images, in one run.

    python -m jobs.job_benchmark                          # 2,048 held-out demo images, 2 rounds
    python -m jobs.job_benchmark --images 512 --rounds 1  # quicker

Every job is a fresh process, timed from start to exit (Ray's start-up and model loading included, as a user
pays them); the settings take turns round by round and each keeps its best round. Also reported: what the
pipeline around the engine costs. The engine alone (this process, the default job's settings and the decode
actor's thread count) decodes the same prepared rows; the default job's tokens/s while it decodes is measured
from its output files: each lands when its shard's last row is decoded, so the slope of tokens written against
time is the rate at which the job decodes once running (start-up excluded).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.config import load_config
from pipeline.schema import row_to_request
from pipeline.stages import Preparer, decode_config, load_processor
from specvlm.data.sources import list_shards, read_shard
from specvlm.demo.shards import write_webdataset_shards
from specvlm.engine import build_engine
from specvlm.evaluation.throughput import HELD_OUT_SEED

PER_SHARD = 128


def job(args: list[str]) -> list[str]:
    return [sys.executable, "-m", *args]


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def engine_tokens_per_s(overrides: list[str]) -> float:
    """The default job's engine on its own: the job's config and prepared rows, the decode actor's threads."""
    config = load_config("configs/demo.yaml", overrides)
    prepare = Preparer(config, load_processor(config.model))
    requests = []
    for shard in list_shards(config.input.uri, config.input.format):
        for index, record in enumerate(read_shard(shard)):
            requests.append(row_to_request(prepare({**record, "row_index": index, "is_end": False})))
    torch.set_num_threads(config.compute.torch_threads or int(config.compute.cpus_per_actor))
    decoder = build_engine(config.model, config.draft, decode_config(config)).decoder
    start = time.perf_counter()
    results = decoder.generate(requests)
    return sum(len(r.tokens) for r in results) / (time.perf_counter() - start)


def decoding_tokens_per_s(output: Path) -> float | None:
    """A finished job's tokens/s while it decoded: the slope of its tokens written against time, one point per
    shard file as it landed (least squares, so shards that land together do not skew it). None: too few shards."""
    files = sorted(output.glob("*.parquet"), key=lambda f: f.stat().st_mtime)
    if len(files) < 8:
        return None
    seconds = np.array([f.stat().st_mtime for f in files])
    tokens = np.cumsum([pq.read_table(f, columns=["new_tokens"])["new_tokens"].to_numpy().sum() for f in files])
    return float(np.polyfit(seconds - seconds[0], tokens, 1)[0])


def overhead_line(decoding: list[float | None], engine: float, rounds: int) -> str:
    engine_part = f"the engine alone decodes the same rows at {engine:.0f} tokens/s (best of {rounds}, " + (
        f"{torch.get_num_threads()} torch threads)"
    )
    if None in decoding:
        return f"Pipeline overhead: not measured (fewer than 8 shards); {engine_part}."
    job = max(decoding)
    return (
        f"Pipeline overhead: the default job decodes at {job:.0f} tokens/s once running (best round, from when "
        f"its shard files landed); {engine_part}: **{job / engine:.0%}**."
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("out/job-benchmark"))
    parser.add_argument("--out", type=Path, default=Path("out/job-benchmark.md"))
    args = parser.parse_args(argv)

    shards = args.work / "shards"
    if not shards.exists():
        write_webdataset_shards(
            str(shards), seed=HELD_OUT_SEED, num_shards=args.images // PER_SHARD, per_shard=PER_SHARD
        )
    images = args.images // PER_SHARD * PER_SHARD
    source = f"input.uri={shards}/*.tar"
    # The peer generates as many tokens as the job may, so both do the same work.
    max_new_tokens = load_config("configs/demo.yaml", [source]).decode.max_new_tokens

    def caption(name: str, *sets: str) -> list[str]:
        overrides = [source, f"output.uri={args.work / 'runs' / name}", *sets]
        return job(["jobs.caption", *[f"--set={s}" for s in overrides]])

    settings = {
        "default (VLM draft, gamma auto, batch auto)": caption("default"),
        **{
            f"plain, batch {b}": caption(f"plain-{b}", "draft.kind=none", f"compute.batch_size={b}")
            for b in (8, 64, 256)
        },
        **{
            f"peer script (HF generate), batch {b}": job(
                [
                    "jobs.peer_caption",
                    "--input",
                    str(shards),  # Ray's read_webdataset takes folders and files, not globs
                    "--output",
                    str(args.work / "runs" / f"peer-{b}"),
                    "--batch-size",
                    str(b),
                    "--max-new-tokens",
                    str(max_new_tokens),
                ]
            )
            for b in (64, 256)
        },
    }
    best: dict[str, float] = {}
    decoding: list[float] = []  # the default job's tokens/s while decoding, per round
    for _ in range(args.rounds):
        for name, command in settings.items():
            shutil.rmtree(args.work / "runs", ignore_errors=True)  # every job starts from an empty output
            seconds = timed(command)
            best[name] = min(best.get(name, float("inf")), seconds)
            print(f"{name}: {images / seconds:.1f} images/s", flush=True)
            if name.startswith("default"):
                manifest = json.loads((args.work / "runs" / "default" / "_manifest.json").read_text())
                decoding.append(decoding_tokens_per_s(args.work / "runs" / "default"))
    engine = max(engine_tokens_per_s([source]) for _ in range(args.rounds))

    rate = {name: images / seconds for name, seconds in best.items()}
    best_plain = max((n for n in rate if n.startswith("plain")), key=rate.get)
    best_peer = max((n for n in rate if n.startswith("peer")), key=rate.get)
    default = next(n for n in rate if n.startswith("default"))
    summary = manifest["summary"]
    lines = [
        f"# Job throughput\n\n{images} held-out demo images (world seed {HELD_OUT_SEED}) in {images // PER_SHARD} "
        f"shards; each job a fresh process timed from start to exit; best of {args.rounds} rounds, settings taking "
        f"turns. Command: `python -m jobs.job_benchmark --images {args.images} --rounds {args.rounds}`.\n",
        "| setting | images/s | vs best plain job | vs best peer |",
        "|---|---:|---:|---:|",
    ]
    for name in settings:
        lines.append(
            f"| {name} | {rate[name]:.1f} | {rate[name] / rate[best_plain]:.2f}x | "
            f"{rate[name] / rate[best_peer]:.2f}x |"
        )
    lines += [
        "",
        f"The default job against the best plain job ({best_plain}): **{rate[default] / rate[best_plain]:.2f}x**; "
        f"against the best peer ({best_peer}): **{rate[default] / rate[best_peer]:.2f}x**.",
        "",
        overhead_line(decoding, engine, args.rounds),
        "",
        "The default job's manifest (last round): "
        f"{summary['run_tokens']} tokens, tau {summary['block_efficiency']:.2f}; operating points:",
        "",
        "```",
        json.dumps(manifest.get("operating_points", {}), indent=1),
        "```",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
