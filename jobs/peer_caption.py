"""The script a user might write instead of this pipeline: Ray Data's own WebDataset reader, one actor calling
Hugging Face `generate` (greedy, left-padded batches), Parquet out. No metrics, no error rows, no resume: the
peer whose images/s our caption job must at least match (jobs.job_benchmark runs both).

    python -m jobs.peer_caption --input DIR --output OUT --batch-size 64
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import ray
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from specvlm.demo import ASSETS


class Captioner:
    def __init__(self, model: str, prompt: str, max_new_tokens: int, threads: int):
        torch.set_num_threads(threads)
        self.processor = AutoProcessor.from_pretrained(model)
        self.processor.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32).eval()
        self.prompt, self.max_new_tokens = prompt, max_new_tokens

    def __call__(self, batch: dict) -> dict:
        # Ray's WebDataset reader has already decoded each image to an array (its default decoder).
        images = [Image.fromarray(np.asarray(pixels, dtype=np.uint8)).convert("RGB") for pixels in batch["png"]]
        inputs = self.processor(images=images, text=[self.prompt] * len(images), return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        return {"key": batch["__key__"], "text": np.array(self.processor.batch_decode(new, skip_special_tokens=True))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--input", required=True, help="a folder of WebDataset shards, or one shard (Ray's reader takes no globs)"
    )
    parser.add_argument("--output", required=True)
    parser.add_argument("--model", default=str(ASSETS / "models/target"))
    parser.add_argument("--prompt", default="USER: <image>\ndescribe the image. ASSISTANT:")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the generate actor")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ds = ray.data.read_webdataset(args.input)
    ds = ds.map_batches(
        Captioner,
        fn_constructor_kwargs={
            "model": args.model,
            "prompt": args.prompt,
            "max_new_tokens": args.max_new_tokens,
            "threads": args.threads,
        },
        batch_size=args.batch_size,
        concurrency=1,
    )
    ds.write_parquet(args.output)
    rows = ray.data.read_parquet(args.output).count()
    print(f"peer: {rows} images in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
