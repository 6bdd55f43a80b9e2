"""Throughput of whole jobs, as a user runs them: the default caption job against the best plain-decoding job
and against the script a user would write instead, on the same held-out images cut into shards of each size, in
one run (a cost per shard shows as a default job slower at small shards than at large ones).

    python -m jobs.job_benchmark                                     # 2,048 images as shards of 1, 16, 128, 1,024
    python -m jobs.job_benchmark --images 256 --sizes 1,16 --rounds 1  # quicker

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
from specvlm.evaluation.demo_family import HELD_OUT_SEED

DEFAULT = "default (VLM draft, gamma auto, batch auto)"
# compute.compile=auto decodes eagerly on a CPU under 15,000 rows per actor (pipeline/compiling.py), as here.
COMPILED = "default, compute.compile=on"
PLAIN = (8, 64, 256)  # plain decoding's batch sizes: the best of them is the bar
PEER = (64, 256)
SIZES = (1, 16, 128, 1024)  # images per shard


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


def held_out_shards(work: Path, images: int, size: int) -> Path:
    """The same held-out images as WebDataset shards of `size` images (shard i holds images i*size ... ), written
    once per (images, size)."""
    folder = work / "shards" / f"{images}x{size}"
    if not (folder / "_complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        write_webdataset_shards(str(folder), seed=HELD_OUT_SEED, num_shards=images // size, per_shard=size)
        (folder / "_complete").touch()
    return folder


def size_settings(work: Path, shards: Path, size: int, max_new_tokens: int) -> dict[str, list[str]]:
    """The jobs run over one shard size: the default job, plain decoding at each batch size, the peer script."""
    source = f"input.uri={shards}/*.tar"

    def caption(name: str, *sets: str) -> list[str]:
        overrides = [source, f"output.uri={work / 'runs' / f'{name}-{size}'}", *sets]
        return job(["jobs.caption", *[f"--set={s}" for s in overrides]])

    def peer(batch: int) -> list[str]:
        # Ray's read_webdataset takes folders and files, not globs; the peer generates as many tokens as the job
        # may, so both do the same work.
        output = str(work / "runs" / f"peer-{batch}-{size}")
        flags = ["--input", str(shards), "--output", output, "--batch-size", str(batch)]
        return job(["jobs.peer_caption", *flags, "--max-new-tokens", str(max_new_tokens)])

    return {
        DEFAULT: caption("default"),
        COMPILED: caption("compiled", "compute.compile=on"),
        **{f"plain, batch {b}": caption(f"plain-{b}", "draft.kind=none", f"compute.batch_size={b}") for b in PLAIN},
        **{f"peer script (HF generate), batch {b}": peer(b) for b in PEER},
    }


def ratio(value: float, bar: float) -> str:
    return f"{value:.2f}x" + ("" if value >= bar else " **(below)**")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2048, help="held-out images, the same at every shard size")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="images per shard, comma-separated")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("out/job-benchmark"))
    parser.add_argument("--out", type=Path, default=Path("out/job-benchmark.md"))
    args = parser.parse_args(argv)
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    if args.images % max(sizes):
        parser.error(f"--images {args.images} must be a multiple of every shard size ({args.sizes})")

    max_new_tokens = load_config("configs/demo.yaml", ["input.uri=unused"]).decode.max_new_tokens
    folders = {size: held_out_shards(args.work, args.images, size) for size in sizes}
    settings = {size: size_settings(args.work, folders[size], size, max_new_tokens) for size in sizes}
    best: dict[tuple[int, str], float] = {}
    decoding: dict[int, list[float | None]] = {size: [] for size in sizes}  # the default job's tokens/s, per round
    manifest = {}
    for _ in range(args.rounds):
        for size in sizes:
            for name, command in settings[size].items():
                shutil.rmtree(args.work / "runs", ignore_errors=True)  # every job starts from an empty output
                seconds = timed(command)
                best[size, name] = min(best.get((size, name), float("inf")), seconds)
                print(f"{size} per shard, {name}: {args.images / seconds:.1f} images/s", flush=True)
                if name == DEFAULT:
                    output = args.work / "runs" / f"default-{size}"
                    manifest = json.loads((output / "_manifest.json").read_text())
                    decoding[size].append(decoding_tokens_per_s(output))
    engine = max(engine_tokens_per_s([f"input.uri={folders[sizes[0]]}/*.tar"]) for _ in range(args.rounds))

    rate = {key: args.images / seconds for key, seconds in best.items()}
    default_best = max(rate[size, DEFAULT] for size in sizes)
    lines = [
        f"# Job throughput by shard size\n\n{args.images} held-out demo images (world seed {HELD_OUT_SEED}) as "
        f"shards of {', '.join(map(str, sizes))} images; each job a fresh process timed from start to exit; best "
        f"of {args.rounds} rounds, jobs taking turns. Command: `python -m jobs.job_benchmark --images "
        f"{args.images} --sizes {','.join(map(str, sizes))} --rounds {args.rounds}`.\n",
        "Bars: the default job within 10% of its own best across sizes (>= 0.90x), and >= 1.0x both the best "
        "plain-decoding job and the best peer at the same size.\n",
        "| images per shard | shards | default images/s | vs its best size | best plain (images/s) | vs best plain "
        "| best peer (images/s) | vs best peer |",
        "|---:|---:|---:|---:|---|---:|---|---:|",
    ]
    for size in sizes:
        mine = rate[size, DEFAULT]
        plain = max((n for n in settings[size] if n.startswith("plain")), key=lambda n: rate[size, n])
        peer = max((n for n in settings[size] if n.startswith("peer")), key=lambda n: rate[size, n])
        lines.append(
            f"| {size} | {args.images // size} | {mine:.1f} | {ratio(mine / default_best, 0.9)} | "
            f"{plain.split(', ')[-1]} ({rate[size, plain]:.1f}) | {ratio(mine / rate[size, plain], 1.0)} | "
            f"{peer.split(', ')[-1]} ({rate[size, peer]:.1f}) | {ratio(mine / rate[size, peer], 1.0)} |"
        )
    lines += [
        "",
        "Compiled decode steps in the whole job (start to exit, warm-up included; the compiler's on-disk cache "
        "is warm after the first round, as on any machine that ran a job before): "
        + "; ".join(f"{size} per shard {rate[size, COMPILED] / rate[size, DEFAULT]:.2f}x" for size in sizes)
        + " the default job.",
    ]
    lines += ["", "Every job, images/s (best round):", "", "| setting | " + " | ".join(map(str, sizes)) + " |"]
    lines.append("|---|" + "---:|" * len(sizes))
    for name in settings[sizes[0]]:
        lines.append(f"| {name} | " + " | ".join(f"{rate[size, name]:.1f}" for size in sizes) + " |")
    lines += [""] + [f"{size} per shard: {overhead_line(decoding[size], engine, args.rounds)}" for size in sizes]
    summary = manifest["summary"]
    lines += [
        "",
        f"The default job's manifest (last round, {sizes[-1]} per shard): "
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
