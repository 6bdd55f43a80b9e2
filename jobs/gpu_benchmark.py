"""Engine overhead at real size: a random-weight LLaVA-1.5-7B-shaped target in bf16, replayed drafts.

No weights are needed: the target is built at LLaVA-1.5-7B's shapes (CLIP ViT-L/14 at 336 px, a 32-layer
4096-wide Llama, 32064-token vocabulary) with random weights. Its greedy continuations are recorded, then replayed
as a zero-cost draft accepted token by token with probability a, so the table shows how much of the analytic
speedup limit tau / (gamma * c + 1) (c = 0 here) the engine delivers, next to Hugging Face `generate`.
It needs torch and transformers only (no Ray), so it runs as is on a borrowed GPU:

    python jobs/gpu_benchmark.py                  # 7B shapes, bf16, CUDA
    python jobs/gpu_benchmark.py --shape tiny     # a few seconds on a CPU, to check the script
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script

from specvlm.evaluation.benchmark import markdown_table, run_suite
from specvlm.models.build import LlavaShape, build_llava, build_tokenizer
from specvlm.specdec.requests import Request

SHAPES = {
    "7b": LlavaShape(
        hidden=4096,
        layers=32,
        heads=32,
        kv_heads=32,
        intermediate=11008,
        vision_hidden=1024,
        vision_layers=24,
        vision_heads=16,
        image_size=336,
        patch_size=14,
        max_positions=4096,
    ),
    "tiny": LlavaShape(hidden=128, layers=2, heads=4, kv_heads=4, intermediate=256),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="7b")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SHAPES[args.shape]
    tokenizer = build_tokenizer(["describe the image in detail please"], vocab_size=300)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        target, processor = build_llava(tokenizer, shape, dtype=dtype)
    torch.set_default_dtype(torch.float32)
    if args.shape == "7b":
        # LLaVA-1.5's vocabulary size: the output layer's cost matters for the ratios.
        target.resize_token_embeddings(32064)

    rng = np.random.default_rng(0)
    requests = []
    for i in range(args.requests):
        image = Image.fromarray(rng.integers(0, 255, (shape.image_size, shape.image_size, 3), dtype=np.uint8))
        enc = processor(
            images=image, text=f"USER: <image>\ndescribe image {i} in detail. ASSISTANT:", return_tensors="pt"
        )
        requests.append(Request(enc.input_ids[0].tolist(), enc.pixel_values.to(dtype)))

    # No EOS: every mode generates exactly max_new_tokens per request, so the work is identical.
    rows = run_suite(
        target,
        {},
        {},
        requests,
        max_new_tokens=args.max_new_tokens,
        eos=(-1,),
        pad_id=0,
        batches=tuple(args.batches),
        repeats=args.repeats,
    )
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\n{name}, {args.shape} shapes, {dtype}, {args.requests} requests x {args.max_new_tokens} tokens\n")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
