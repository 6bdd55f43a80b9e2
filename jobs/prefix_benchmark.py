"""Several questions per image: the VQA job with image prefill sharing on against the same job with it off, and
against plain decoding (draft.kind=none, sharing on, at each of a few batch sizes), a user's alternative.

    python -m jobs.prefix_benchmark                       # 64 held-out scenes x 5 questions, 2 rounds
    python -m jobs.prefix_benchmark --scenes 16 --rounds 1 --plain-batches 64

The questions come from the demo world (each scene's own question and four others it can answer), one JSONL line
each, the five lines of one image next to each other, as a VQAv2-style layout lists them. Every job is a fresh
process, timed from start to exit; the settings take turns and each keeps its best round. The outputs of
sharing on and off must be identical row for row.

The engine alone (in this process, on the same prepared rows, after a warm-up) gives where the time goes:
admission (the vision tower and every prefill pass) against decoding steps, the prefill share of the engine's
time, how many requests started from a kept prefix, and the ceiling: the engine's speed-up over sharing off if
prefill cost nothing at all (its time over its decoding time).

The demo's images are 9 tokens of a 28-token prompt, so sharing them saves little there. A last section asks the
same five questions about large images, engine alone: LLaVA-NeXT anyres crops on a tiny random target and its
truncated-copy draft (specvlm/evaluation/workloads.py), 1,400-2,600 image tokens per prompt, 8 new tokens each,
plain and speculative with sharing on and off, taking turns (--anyres-images 0 leaves it out).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
from transformers import AutoTokenizer

from jobs.job_benchmark import job, timed
from pipeline.config import load_config
from pipeline.schema import row_to_request
from pipeline.stages import Preparer, decode_config, load_processor
from specvlm.data.sources import list_shards, read_shard
from specvlm.demo.shards import encode_image
from specvlm.demo.world import make_scene
from specvlm.demo.world_data import scene_questions
from specvlm.engine import DraftSettings, build_draft, build_engine
from specvlm.evaluation.demo_family import DEMO_MODELS, HELD_OUT_SEED
from specvlm.evaluation.throughput import decode, take_turns
from specvlm.evaluation.workloads import anyres_question_requests, build_anyres_models
from specvlm.models.loading import load_target
from specvlm.specdec.decode import generation_eos

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


def prepared_requests(overrides: list[str]) -> list:
    config = load_config("configs/demo-vqa.yaml", overrides)
    prepare = Preparer(config, load_processor(config.model))
    requests = []
    for shard in list_shards(config.input.uri, config.input.format):
        for index, record in enumerate(read_shard(shard)):
            requests.append(row_to_request(prepare({**record, "row_index": index, "is_end": False})))
    return requests


def engine_alone(overrides: list[str], requests: list) -> dict:
    """The engine's seconds (admission, decoding), questions/s and kept-prefix hits on the prepared requests."""
    config = load_config("configs/demo-vqa.yaml", overrides)
    decoder = build_engine(config.model, config.draft, decode_config(config)).decoder
    start = time.perf_counter()
    decoder.generate(requests)
    elapsed = time.perf_counter() - start
    cache = decoder.prefix_cache
    return {**decoder.seconds, "rate": len(requests) / elapsed, "hits": cache.hits if cache is not None else 0}


def anyres_engine(work: Path, images: int, rounds: int, cap: int = 16, max_new_tokens: int = 8) -> None:
    """Engine alone, QUESTIONS questions about each of `images` large images: plain and speculative decoding,
    image prefill sharing on and off, taking turns; prints the table."""
    folders = build_anyres_models(AutoTokenizer.from_pretrained(DEMO_MODELS / "target"), work / "anyres")
    target = load_target(str(folders[0]), device="cpu", dtype="float32")
    requests = anyres_question_requests(target.processor, images, QUESTIONS)
    settings = dict(max_new_tokens=max_new_tokens, eos=generation_eos(target.model))

    def run(speculative: bool, share: bool):
        draft = build_draft(DraftSettings("vlm", str(folders[1])), target) if speculative else None
        return lambda: decode(target.model, draft, requests, cap, share_prefill=share, **settings)

    names = {
        (mode, share): f"{mode}, sharing {'on' if share else 'off'}"
        for mode in ("plain", "speculative")
        for share in (True, False)
    }
    measured = take_turns({name: run(mode == "speculative", share) for (mode, share), name in names.items()}, rounds)
    tokens = {name: [r.tokens for r in results] for name, (_, results, _) in measured.items()}
    best = {name: min(seconds) for name, (seconds, _, _) in measured.items()}
    plain = min(best[names["plain", True]], best[names["plain", False]])
    lengths = [len(r.input_ids) for r in requests]
    print(
        f"\nLarge images, engine alone: {images} anyres images x {QUESTIONS} questions = {len(requests)} rows, "
        f"prompts of {min(lengths)}-{max(lengths)} tokens, {max_new_tokens} new tokens, cap {cap}, best of "
        f"{rounds}; identical in every setting: {len({str(t) for t in tokens.values()}) == 1}\n"
    )
    print("| setting | questions/s | vs sharing off | vs best plain | admission share |")
    print("|---|---:|---:|---:|---:|")
    for (mode, _), name in names.items():
        seconds = measured[name][2]["seconds"]
        off = best[names[mode, False]]
        share_of_time = seconds["admission"] / (seconds["admission"] + seconds["decoding"])
        print(
            f"| {name} | {len(requests) / best[name]:.2f} | {off / best[name]:.2f}x | {plain / best[name]:.2f}x "
            f"| {share_of_time:.0%} |"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--plain-batches", default="8,64", help="plain decoding's batch sizes, comma-separated")
    parser.add_argument("--anyres-images", type=int, default=8, help="large images in the last section (0: none)")
    parser.add_argument("--work", type=Path, default=Path("out/prefix-benchmark"))
    args = parser.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    layout = write_layout(args.work / "in", args.scenes)
    common = [f"input.uri={layout}", "input.format=jsonl"]
    settings = {
        "speculative, sharing on": ["compute.share_image_prefill=true"],
        "speculative, sharing off": ["compute.share_image_prefill=false"],
        **{
            f"plain, sharing on, batch {b}": ["draft.kind=none", f"compute.batch_size={b}"]
            for b in args.plain_batches.split(",")
        },
    }
    best, rows = {}, {}
    for _ in range(args.rounds):
        for name, sets in settings.items():
            out = args.work / name.replace(" ", "-").replace(",", "")
            shutil.rmtree(out, ignore_errors=True)
            command = ["jobs.vqa", "--config", "configs/demo-vqa.yaml"]
            seconds = timed(job([*command, *(f"--set={s}" for s in [*common, f"output.uri={out}", *sets])]))
            best[name] = min(best.get(name, seconds), seconds)
            rows[name] = outputs(out)
            print(f"{name}: {len(rows[name]) / seconds:.2f} questions/s", flush=True)
    on, off = "speculative, sharing on", "speculative, sharing off"
    questions = len(rows[on])
    identical = rows[on] == rows[off]
    plain = min((n for n in settings if n.startswith("plain")), key=best.get)  # the fastest
    print(f"{args.scenes} images x {QUESTIONS} questions = {questions} rows; identical row for row: {identical}")
    print("| setting | job questions/s | vs sharing off | vs best plain |")
    print("|---|---:|---:|---:|")
    for name in settings:
        rate = questions / best[name]
        print(f"| {name} | {rate:.2f} | {best[off] / best[name]:.2f}x | {best[plain] / best[name]:.2f}x |")

    requests = prepared_requests([*common, "output.uri=unused"])
    engine_alone([*common, "output.uri=unused"], requests[: 2 * QUESTIONS])  # the process's one-off warm-up
    print("\nThe engine alone on the same prepared rows:\n")
    print("| setting | questions/s | admission s | decoding s | prefill share | started from a kept prefix |")
    print("|---|---:|---:|---:|---:|---:|")
    engine = {}
    for name in (on, off):
        e = engine[name] = engine_alone([*common, "output.uri=unused", *settings[name]], requests)
        share = e["admission"] / (e["admission"] + e["decoding"])
        print(f"| {name} | {e['rate']:.2f} | {e['admission']:.1f} | {e['decoding']:.1f} | {share:.1%} | {e['hits']} |")
    ceiling = (engine[off]["admission"] + engine[off]["decoding"]) / engine[off]["decoding"]
    print(f"\nengine speed-up, sharing on vs off: {engine[on]['rate'] / engine[off]['rate']:.2f}x; ceiling if prefill")
    print(f"cost nothing (sharing off's engine time over its decoding time): {ceiling:.2f}x")
    print(f"job speed-up, sharing on vs off: {best[off] / best[on]:.2f}x; vs the best plain job ({plain}):")
    print(f"{best[plain] / best[on]:.2f}x")
    if args.anyres_images:
        anyres_engine(args.work, args.anyres_images, args.rounds)
    if not identical:
        raise SystemExit("outputs differ between sharing on and off")


if __name__ == "__main__":
    main()
