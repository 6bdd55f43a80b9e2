"""Engine speed at controlled acceptance: speculative (replay draft) vs this engine's autoregressive mode.

A random-weight LLaVA target is built in memory; its greedy continuations are recorded by an autoregressive
run, then replayed as drafts with a chosen corruption rate. Every mode runs on the same requests in the same
process, and the table reports ratios (tokens/s relative to autoregressive at the same batch size), block
efficiency tau, and whether the output is token-identical to the autoregressive output.

    python -m benchmarks.engine_speed            # default sizes
    python -m benchmarks.engine_speed --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image
from transformers.utils import logging as hf_logging

from specvlm.bench.replay import ReplayDraft
from specvlm.models.build import LlavaShape, build_llava, build_tokenizer
from specvlm.specdec.decode import DecodeConfig, SpeculativeDecoder
from specvlm.specdec.requests import Request


def make_requests(processor, n: int) -> list[Request]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        image = Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
        enc = processor(images=image, text=f"USER: <image>\ndescribe picture {i} ASSISTANT:", return_tensors="pt")
        out.append(Request(enc.input_ids[0].tolist(), enc.pixel_values))
    return out


def timed(decoder: SpeculativeDecoder, requests: list[Request], batch: int):
    start = time.perf_counter()
    results = []
    for i in range(0, len(requests), batch):
        results += decoder.generate(requests[i: i + batch])
    return results, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model and few requests")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--gamma", type=int, default=5)
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)

    if args.quick:
        shape, n_requests, max_new = LlavaShape(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256), 8, 24
    else:
        shape = LlavaShape(hidden=512, layers=4, heads=8, kv_heads=8, intermediate=1536)
        n_requests, max_new = 16, args.max_new_tokens
    tokenizer = build_tokenizer(["describe the picture please"], vocab_size=300)
    target, processor = build_llava(tokenizer, shape)
    requests = make_requests(processor, n_requests)
    vocab = target.config.text_config.vocab_size
    # No EOS: every row generates exactly max_new tokens, so all modes do the same work.
    config = DecodeConfig(max_new_tokens=max_new, gamma=args.gamma, eos_token_ids=())

    print(f"target: {sum(p.numel() for p in target.parameters()) / 1e6:.1f}M params, {n_requests} requests, "
          f"{max_new} new tokens each, gamma={args.gamma}, {torch.get_num_threads()} threads")
    print(f"{'batch':>5} {'draft':<14} {'tau':>5} {'accept':>6} {'tok/s vs AR':>11} {'identical':>9}")
    for batch in (1, 8):
        ar_results, ar_time = timed(SpeculativeDecoder(target, None, config), requests, batch)
        scripts = [r.tokens for r in ar_results]
        print(f"{batch:>5} {'none (AR)':<14} {1.0:>5.2f} {'-':>6} {1.0:>11.2f} {'-':>9}")
        for error_rate in (0.1, 0.3, 0.5):
            draft = ReplayDraft(scripts, error_rate=error_rate, vocab_size=vocab, device=target.device)
            results, elapsed = [], 0.0
            for i in range(0, n_requests, batch):  # the replay draft holds one script per request of a batch
                draft.scripts = scripts[i: i + batch]
                part, seconds = timed(SpeculativeDecoder(target, draft, config), requests[i: i + batch], batch)
                results += part
                elapsed += seconds
            tau = sum(r.metrics.new_tokens for r in results) / sum(r.metrics.target_calls for r in results)
            accept = sum(r.metrics.accepted_tokens for r in results) / sum(r.metrics.proposed_tokens for r in results)
            same = all(r.tokens == s for r, s in zip(results, scripts))
            print(f"{batch:>5} {f'replay e={error_rate}':<14} {tau:>5.2f} {accept:>6.2f} {ar_time / elapsed:>11.2f} "
                  f"{str(same):>9}")


if __name__ == "__main__":
    main()
