"""The engine at real width with replayed drafts: how much of the analytic speedup it delivers where verification
is bound by reading weights, what compiled steps buy, and whether it beats vLLM's plain decoding.

No weights are needed: the target is built at LLaVA-1.5-7B's shapes with random weights. Its greedy
continuations are recorded, then replayed as a zero-cost draft accepted token by token with probability a (and
as trees whose extra siblings are wrong). The sections (--sections, in this order):

  suite       every mode side by side (specvlm/evaluation/benchmark.py): achieved speedup against
              tau / (gamma * c + 1) (c = 0 here) and against tau / r, with r the measured cost of a verification
              pass over a one-token pass;
  caps        the controller under load: plain decoding against replayed speculation at each running-batch cap;
  continuous  continuous against static batching, on requests whose output lengths vary widely;
  compile     compiled against eager decode steps (compute.compile), plain and speculative, at each cap: CUDA
              graphs on a GPU, inductor on a CPU (specvlm/evaluation/compile_comparison.py);
  vllm        vLLM plain decoding of the same target on the same prompts and lengths, in images/s against the
              engine's best plain and best speculative setting of the caps and compile sections (it adds compile
              where neither is chosen); skipped, with a line saying why, where vllm does not import.

--check-kernels runs no section: it decodes (plain, chain, tree) with PyTorch's unfused math attention excluded
and exits 1 if any attention call would need it (specvlm/evaluation/kernels.py).

It needs torch and transformers only (no Ray; vllm for its section):

    python jobs/gpu_benchmark.py                        # 7B shapes, bf16, on a GPU
    python jobs/gpu_benchmark.py --check-kernels        # which attention kernels each path runs, on a GPU
    python jobs/gpu_benchmark.py --shape wide --dtype bfloat16 --batches 1 --sections suite
                                                        # LLaVA-1.5's width at 4 layers (1.1B) on a CPU with
                                                        # bf16 instructions: weight-bound, r about 1 (in
                                                        # float32, 2 cores are arithmetic-bound: r = 2.2)
    python jobs/gpu_benchmark.py --shape tiny --requests 4 --max-new-tokens 16 --batches 2 --caps 2 4 --repeats 2
                                                        # every section on a CPU in minutes, to check the script
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script

from specvlm.evaluation.benchmark import markdown_table, run_suite
from specvlm.evaluation.compile_comparison import TABLE_HEADER, compare
from specvlm.evaluation.kernels import check_engine
from specvlm.evaluation.replay import ReplayDraft, record_scripts
from specvlm.evaluation.throughput import Run, cap_sweep, cap_table, continuous_vs_static
from specvlm.evaluation.vllm_plain import EngineSetting, run_vllm, save_checkpoint, versus_table, vllm_missing
from specvlm.models.build import LlavaShape, build_llava, build_tokenizer
from specvlm.specdec.compiled import cuda_graphs
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


SECTIONS = ("suite", "caps", "continuous", "compile", "vllm")


def sections_to_run(chosen: list[str]) -> list[str]:
    """The chosen sections in the order they run. vLLM is compared with engine settings measured in the same run,
    so it brings the compile section where neither caps nor compile is chosen; it runs last, because the target
    leaves the GPU for it."""
    wanted = set(chosen)
    if "vllm" in wanted and not wanted & {"caps", "compile"}:
        wanted.add("compile")
    return [name for name in SECTIONS if name in wanted]


@dataclass
class Prompts:
    processor: object
    requests: list[Request]
    texts_and_images: list[tuple[str, Image.Image]]  # what vLLM is given for the same requests
    preprocess_seconds: float  # the processor's time over all of them


def make_prompts(processor, shape, count: int, dtype) -> Prompts:
    rng = np.random.default_rng(0)
    requests, raw = [], []
    start = time.perf_counter()
    for i in range(count):
        image = Image.fromarray(rng.integers(0, 255, (shape.image_size, shape.image_size, 3), dtype=np.uint8))
        text = f"USER: <image>\ndescribe image {i} in detail. ASSISTANT:"
        enc = processor(images=image, text=text, return_tensors="pt")
        requests.append(Request(enc.input_ids[0].tolist(), enc.pixel_values.to(dtype)))
        raw.append((text, image))
    return Prompts(processor, requests, raw, time.perf_counter() - start)


@dataclass
class Bench:
    """What the sections share: the target, its requests, and the engine settings measured so far."""

    target: torch.nn.Module
    prompts: Prompts
    args: argparse.Namespace
    report: object  # text -> None: prints, and appends to --out
    eos: tuple[int, ...] = (-1,)  # no EOS: every mode generates max_new_tokens, the same work
    scripts: dict = field(default_factory=dict)  # recorded continuations, for the replayed drafts
    measured: list[EngineSetting] = field(default_factory=list)  # for the vLLM table

    @property
    def requests(self) -> list[Request]:
        return self.prompts.requests

    def replay(self, a: float, gamma: int = 8):
        vocab = self.target.get_output_embeddings().weight.shape[0]
        return lambda: ReplayDraft(
            self.scripts, error_rate=1 - a, target_vocab=vocab, device=self.target.device, gamma=gamma
        )

    def keep(self, run: Run, mode: str) -> None:
        self.measured.append(
            EngineSetting(
                f"{run.name}, {mode}, cap {run.cap or 'auto'}",
                run.name != "plain",
                min(run.seconds),
                [r.tokens for r in run.results],
            )
        )


def suite_section(bench: Bench) -> None:
    args = bench.args
    rows = run_suite(
        bench.target,
        {},
        {},
        bench.requests,
        max_new_tokens=args.max_new_tokens,
        eos=bench.eos,
        pad_id=0,
        batches=tuple(args.batches),
        repeats=args.repeats,
        replay_trees=(2, 4),
    )
    bench.report(markdown_table(rows))


def record(bench: Bench) -> None:
    """The target's own continuations, which the replayed drafts of the later sections propose."""
    start = time.perf_counter()
    config = DecodeConfig(
        max_new_tokens=bench.args.max_new_tokens, eos_token_ids=bench.eos, max_rows=max(bench.args.caps)
    )
    reference = SpeculativeDecoder(bench.target, None, config).generate(bench.requests)
    bench.scripts.update(record_scripts(bench.requests, [out.tokens for out in reference]))
    print(f"(recorded {len(bench.requests)} continuations in {time.perf_counter() - start:.0f} s)\n", flush=True)


def caps_section(bench: Bench) -> None:
    args = bench.args
    drafts = {"replay a=0.8, adaptive": bench.replay(0.8), "replay a=0.8, fixed γ=5": bench.replay(0.8, 5)}
    runs = cap_sweep(
        bench.target,
        drafts,
        bench.requests,
        tuple(args.caps),
        max_new_tokens=args.max_new_tokens,
        eos=bench.eos,
        rounds=max(1, args.repeats - 1),
    )
    bench.report(cap_table(runs))
    for run in runs:
        bench.keep(run, "eager")


def continuous_section(bench: Bench) -> None:
    args = bench.args
    # Output lengths from an eighth of the maximum to all of it, as short answers mixed with long captions.
    spread = [
        Request(r.input_ids, r.pixel_values, max_new_tokens=max(1, args.max_new_tokens * (1 + i % 8) // 8))
        for i, r in enumerate(bench.requests)
    ]
    for make, label in ((lambda: None, "none"), (bench.replay(0.8), "replay a=0.8, adaptive")):
        cap = max(2, min(args.caps[-1], len(spread) // 4))
        r = continuous_vs_static(
            bench.target,
            make,
            spread,
            cap,
            max_new_tokens=args.max_new_tokens,
            eos=bench.eos,
            rounds=max(1, args.repeats - 1),
        )
        bench.report(
            f"continuous vs static, draft {label}, cap {cap}: {r['speedup']:.2f}x "
            f"({r['static_tokens_per_s']:.0f} -> {r['continuous_tokens_per_s']:.0f} tok/s), "
            f"identical {r['identical']}"
        )


def compile_section(bench: Bench) -> None:
    args = bench.args
    lines = list(TABLE_HEADER)
    comparisons = compare(
        bench.target,
        {"plain": None, "replay a=0.8, adaptive": bench.replay(0.8)},
        bench.requests,
        tuple(args.caps),
        max_new_tokens=args.max_new_tokens,
        eos=bench.eos,
        rounds=max(2, args.repeats),
    )
    backend = None
    for comparison in comparisons:
        if comparison.fell_back:
            bench.report(f"compiling failed, the compiled run decoded eagerly: {comparison.fell_back}")
        backend = comparison.backend
        lines.append(comparison.table_row())
        print(lines[-1], flush=True)
        bench.keep(comparison.eager, "eager")
        bench.keep(comparison.compiled, "compiled")
    bench.report(
        f"Compiled ({backend}) against eager decode steps, best of {max(2, args.repeats)} rounds taking turns; "
        "the first round's extra seconds are its compile.\n\n" + "\n".join(lines)
    )


def vllm_section(bench: Bench) -> None:
    """vLLM plain decoding on the GPU the target leaves: the last section."""
    missing = vllm_missing()
    if missing:
        bench.report(f"vLLM plain decoding: skipped, {missing}.")
        return
    with tempfile.TemporaryDirectory(prefix="specvlm-vllm-") as scratch:
        checkpoint = save_checkpoint(bench.target, bench.prompts.processor, bench.args.checkpoint_dir or Path(scratch))
        dtype = bench.target.dtype
        bench.target = None  # vLLM takes a share of the memory free at its start: give it the target's
        torch.compiler.reset()  # compiled forwards and their CUDA graphs hold the target's buffers
        gc.collect()
        torch.cuda.empty_cache()
        run = run_vllm(
            checkpoint,
            bench.prompts.texts_and_images,
            max_new_tokens=bench.args.max_new_tokens,
            dtype=dtype,
            rounds=max(1, bench.args.repeats),
            max_num_seqs=bench.args.vllm_max_seqs,
        )
    bench.report(versus_table(run, bench.measured, bench.prompts.preprocess_seconds))


RUN = {
    "suite": suite_section,
    "caps": caps_section,
    "continuous": continuous_section,
    "compile": compile_section,
    "vllm": vllm_section,
}


def kernels_check(bench: Bench) -> bool:
    """Reports which fused kernels each path runs; False where a path would run unfused math attention."""
    device = bench.target.device
    found = check_engine(
        bench.target,
        bench.requests[:4],
        max_new_tokens=min(16, bench.args.max_new_tokens),
        static_shapes=cuda_graphs(device),
    )
    lines = ["| path | SDPA kernels, math attention excluded |", "|---|---|"]
    for path, kernels in found.items():
        cell = f"FAILED: {kernels}" if isinstance(kernels, Exception) else ", ".join(sorted(kernels))
        lines.append(f"| {path} | {cell} |")
    shapes = "bucketed shapes, as compiled steps on a GPU meet them" if cuda_graphs(device) else "exact shapes"
    bench.report(f"Attention kernels, eager steps at {shapes}:\n\n" + "\n".join(lines))
    return not any(isinstance(k, Exception) for k in found.values())


def main(argv=None) -> None:
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
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument(
        "--check-kernels", action="store_true", help="only check the attention kernels; exit 1 where one is unfused"
    )
    parser.add_argument("--vllm-max-seqs", type=int, help="vLLM's max_num_seqs (default: vLLM's own)")
    parser.add_argument(
        "--checkpoint-dir", type=Path, help="where the target is saved for vLLM (default: a temporary folder)"
    )
    parser.add_argument("--out", type=Path, help="also write the tables to this Markdown file")
    args = parser.parse_args(argv)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# GPU benchmark\n\nCommand: `python jobs/gpu_benchmark.py {command}`\n")

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
    bench = Bench(target, make_prompts(processor, shape, args.requests, dtype), args, report)
    del target  # held by bench alone, which the vLLM section empties to free the GPU
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    report(
        f"{name}; {args.shape} shapes, {params / 1e9:.2f}B parameters, {dtype}; {args.requests} requests x "
        f"{args.max_new_tokens} tokens; no EOS, so every mode does the same work"
    )
    if args.check_kernels:
        if not kernels_check(bench):
            raise SystemExit(1)
        return
    sections = sections_to_run(args.sections)
    if set(sections) - {"suite"}:
        record(bench)
    for section in sections:
        RUN[section](bench)


if __name__ == "__main__":
    main()
