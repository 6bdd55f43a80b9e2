"""Several questions per image: the VQA job with image prefill sharing on against the same job with it off.

    python -m jobs.prefix_benchmark                       # 64 held-out scenes x 5 questions, 2 rounds
    python -m jobs.prefix_benchmark --scenes 16 --rounds 1

The questions come from the demo world (each scene's own question and four others it can answer), one JSONL line
each, the five lines of one image next to each other, as a VQAv2-style layout lists them. Every job is a fresh
process, timed from start to exit; the settings take turns and each keeps its best round. The outputs must be
identical row for row. The prefill share (admission seconds over the engine's seconds) is measured on the engine
alone, in this process, on the same prepared rows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq

from jobs.job_benchmark import job, timed
from pipeline.config import load_config
from pipeline.schema import row_to_request
from pipeline.stages import Preparer, decode_config, load_processor
from specvlm.data.sources import list_shards, read_shard
from specvlm.demo.shards import encode_image
from specvlm.demo.world import make_scene
from specvlm.demo.world_data import scene_questions
from specvlm.engine import build_engine
from specvlm.evaluation.demo_family import HELD_OUT_SEED

QUESTIONS = 5


def write_layout(root: Path, scenes: int) -> Path:
    """images/ and questions.jsonl: QUESTIONS lines per scene, adjacent."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(scenes):
        scene = make_scene(HELD_OUT_SEED, index)
        name = f"images/scene{index:05d}.jpg"
        (root / name).write_bytes(encode_image(scene, "jpg"))
        for number, (question, answer) in enumerate(scene_questions(scene, QUESTIONS)):
            row = {"id": f"s{index}q{number}", "image": name, "question": question, "answer": answer}
            lines.append(json.dumps(row))
    path = root / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def outputs(uri: Path) -> list[dict]:
    rows = [r for f in sorted(uri.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    return sorted(({"key": r["key"], "output_ids": r["output_ids"], "text": r["text"]} for r in rows), key=str)


def engine_prefill_share(overrides: list[str]) -> tuple[float, float, int]:
    """(prefill share, questions/s, questions) of the engine alone on the job's prepared rows."""
    config = load_config("configs/demo-vqa.yaml", overrides)
    prepare = Preparer(config, load_processor(config.model))
    requests = []
    for shard in list_shards(config.input.uri, config.input.format):
        for index, record in enumerate(read_shard(shard)):
            requests.append(row_to_request(prepare({**record, "row_index": index, "is_end": False})))
    decoder = build_engine(config.model, config.draft, decode_config(config)).decoder
    start = time.perf_counter()
    decoder.generate(requests)
    elapsed = time.perf_counter() - start
    seconds = decoder.seconds
    return seconds["admission"] / (seconds["admission"] + seconds["decoding"]), len(requests) / elapsed, len(requests)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("out/prefix-benchmark"))
    args = parser.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    layout = write_layout(args.work / "in", args.scenes)
    common = [f"input.uri={layout}", "input.format=jsonl"]
    settings = {"sharing on": "true", "sharing off": "false"}
    best, rows = {}, {}
    for _ in range(args.rounds):
        for name, share in settings.items():
            out = args.work / name.replace(" ", "-")
            shutil.rmtree(out, ignore_errors=True)
            sets = [*common, f"output.uri={out}", f"compute.share_image_prefill={share}"]
            seconds = timed(job(["jobs.vqa", "--config", "configs/demo-vqa.yaml", *(f"--set={s}" for s in sets)]))
            best[name] = min(best.get(name, seconds), seconds)
            rows[name] = outputs(out)
    questions = len(rows["sharing on"])
    identical = rows["sharing on"] == rows["sharing off"]
    print(f"{args.scenes} images x {QUESTIONS} questions = {questions} rows; identical row for row: {identical}")
    print("| setting | job questions/s | engine questions/s | prefill share of the engine's time |")
    print("|---|---:|---:|---:|")
    for name, share in settings.items():
        prefill, rate, _ = engine_prefill_share([*common, "output.uri=unused", f"compute.share_image_prefill={share}"])
        print(f"| {name} | {questions / best[name]:.2f} | {rate:.2f} | {prefill:.1%} |")
    print(f"job speed-up, sharing on vs off: {best['sharing off'] / best['sharing on']:.2f}x")
    if not identical:
        raise SystemExit("outputs differ between sharing on and off")


if __name__ == "__main__":
    main()
