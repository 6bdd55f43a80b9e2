"""The engine at real width with replayed drafts: how much of the analytic speedup it delivers where verification
is bound by reading weights, and how continuous batching and the controller behave there.

No weights are needed: the target is built at LLaVA-1.5-7B's shapes with random weights. Its greedy
continuations are recorded, then replayed as a zero-cost draft accepted token by token with probability a (and
as trees whose extra siblings are wrong), so the tables show

  1. every mode side by side (specvlm/evaluation/benchmark.py): achieved speedup against tau / (gamma * c + 1)
     (c = 0 here) and against tau / r, with r the measured cost of a verification pass over a one-token pass;
  2. the controller under load: plain decoding against replayed speculation at each running-batch cap;
  3. continuous against static batching, on requests whose output lengths vary widely.

It needs torch and transformers only (no Ray):

    python jobs/gpu_benchmark.py                        # 7B shapes, bf16, on a GPU
    python jobs/gpu_benchmark.py --shape wide --dtype bfloat16 --batches 1 --sections suite
                                                        # LLaVA-1.5's width at 4 layers (1.1B) on a CPU with
                                                        # bf16 instructions: weight-bound, r about 1 (in
                                                        # float32, 2 cores are arithmetic-bound: r = 2.2)
    python jobs/gpu_benchmark.py --shape tiny           # seconds, to check the script
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script

from specvlm.evaluation.benchmark import markdown_table, run_suite
from specvlm.evaluation.replay import ReplayDraft, record_scripts
from specvlm.evaluation.throughput import cap_sweep, cap_table, continuous_vs_static
from specvlm.models.build import LlavaShape, build_llava, build_tokenizer
from specvlm.specdec.decode import DecodeConfig, SpeculativeDecoder
from specvlm.specdec.requests import Request

# LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (576 image tokens), a 32-layer 4096-wide Llama, 32064-token vocabulary.
SEVEN_B = dict(hidden=4096, heads=32, kv_heads=32, intermediate=11008, max_positions=4096)
SHAPES = {
    "7b": (
        LlavaShape(
            layers=32, vision_hidden=1024, vision_layers=24, vision_heads=16, image_size=336, patch_size=14, **SEVEN_B
        ),
        32064,
    ),
    # The same width at 4 layers and a small tower: 1.1B parameters, whose decode steps read 2.2 GB of bf16
    # weights on a CPU, as a 7B model's read 14 GB on a GPU. In bf16 on a CPU with bf16 dot products a pass over
    # a verification window costs about what a one-token pass does (r = 1.0-1.2 measured on 2 cores); in
    # float32 2 cores are bound by arithmetic over the window (r = 2.2).
    "wide": (
        LlavaShape(
            layers=4, vision_hidden=64, vision_layers=2, vision_heads=2, image_size=112, patch_size=14, **SEVEN_B
        ),
        32064,
    ),
    "tiny": (LlavaShape(hidden=128, layers=2, heads=4, kv_heads=4, intermediate=256), None),
}


def build(shape_name: str, device: torch.device, dtype: torch.dtype):
    shape, vocab = SHAPES[shape_name]
    tokenizer = build_tokenizer(["describe the image in detail please"], vocab_size=300)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        target, processor = build_llava(tokenizer, shape, dtype=dtype)
    torch.set_default_dtype(torch.float32)
    if vocab is not None:
        target.resize_token_embeddings(vocab)  # the output layer's cost matters for the ratios
    target.generation_config.eos_token_id = None  # every mode generates max_new_tokens: the same work
    params = sum(p.numel() for p in target.parameters())
    return target, processor, shape, params


def make_requests(processor, shape, count: int, dtype, spread: bool = False) -> list[Request]:
    rng = np.random.default_rng(0)
    requests = []
    for i in range(count):
        image = Image.fromarray(rng.integers(0, 255, (shape.image_size, shape.image_size, 3), dtype=np.uint8))
        enc = processor(
            images=image, text=f"USER: <image>\ndescribe image {i} in detail. ASSISTANT:", return_tensors="pt"
        )
        requests.append(Request(enc.input_ids[0].tolist(), enc.pixel_values.to(dtype)))
    return requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="7b")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--caps", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="auto: bfloat16 on a GPU, float32 on a CPU (a CPU with bf16 instructions can take bfloat16)",
    )
    parser.add_argument(
        "--sections", nargs="+", default=["suite", "caps", "continuous"], choices=["suite", "caps", "continuous"]
    )
    parser.add_argument("--out", type=Path, help="also write the tables to this Markdown file")
    args = parser.parse_args()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# GPU benchmark\n\nCommand: `python {' '.join(sys.argv)}`\n")

    def report(text: str) -> None:
        print(text, "\n", flush=True)
        if args.out:
            with args.out.open("a") as out:  # section by section: a run that dies keeps what it measured
                out.write(f"\n{text}\n")

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    target, processor, shape, params = build(args.shape, device, dtype)
    requests = make_requests(processor, shape, args.requests, dtype)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    report(
        f"{name}; {args.shape} shapes, {params / 1e9:.2f}B parameters, {dtype}; {args.requests} requests x "
        f"{args.max_new_tokens} tokens; no EOS, so every mode does the same work"
    )
    eos = (-1,)

    if "suite" in args.sections:
        rows = run_suite(
            target,
            {},
            {},
            requests,
            max_new_tokens=args.max_new_tokens,
            eos=eos,
            pad_id=0,
            batches=tuple(args.batches),
            repeats=args.repeats,
            replay_trees=(2, 4),
        )
        report(markdown_table(rows))
    if not {"caps", "continuous"} & set(args.sections):
        return

    # Recorded continuations for the replayed drafts below.
    start = time.perf_counter()
    reference = SpeculativeDecoder(
        target, None, DecodeConfig(max_new_tokens=args.max_new_tokens, eos_token_ids=eos, max_rows=max(args.caps))
    ).generate(requests)
    scripts = record_scripts(requests, [out.tokens for out in reference])
    vocab = target.get_output_embeddings().weight.shape[0]
    print(f"(recorded {len(requests)} continuations in {time.perf_counter() - start:.0f} s)\n", flush=True)

    def replay(a: float, gamma: int = 8):
        return lambda: ReplayDraft(scripts, error_rate=1 - a, target_vocab=vocab, device=device, gamma=gamma)

    if "caps" in args.sections:
        drafts = {"replay a=0.8, adaptive": replay(0.8), "replay a=0.8, fixed γ=5": replay(0.8, 5)}
        runs = cap_sweep(
            target,
            drafts,
            requests,
            tuple(args.caps),
            max_new_tokens=args.max_new_tokens,
            eos=eos,
            rounds=max(1, args.repeats - 1),
        )
        report(cap_table(runs))

    if "continuous" in args.sections:
        # Output lengths from an eighth of the maximum to all of it, as short answers mixed with long captions.
        spread = [
            Request(r.input_ids, r.pixel_values, max_new_tokens=max(1, args.max_new_tokens * (1 + i % 8) // 8))
            for i, r in enumerate(requests)
        ]
        for make, label in ((lambda: None, "none"), (replay(0.8), "replay a=0.8, adaptive")):
            cap = max(2, min(args.caps[-1], len(spread) // 4))
            r = continuous_vs_static(
                target, make, spread, cap, max_new_tokens=args.max_new_tokens, eos=eos, rounds=max(1, args.repeats - 1)
            )
            report(
                f"continuous vs static, draft {label}, cap {cap}: {r['speedup']:.2f}x "
                f"({r['static_tokens_per_s']:.0f} -> {r['continuous_tokens_per_s']:.0f} tok/s), "
                f"identical {r['identical']}"
            )


if __name__ == "__main__":
    main()
