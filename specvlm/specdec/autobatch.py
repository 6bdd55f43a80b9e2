"""How many rows to decode together, found by measurement (batch size "auto").

Throughput jobs want the running batch as large as pays: more rows share each weight read, until the device
turns compute-bound and tokens/s stops rising. Where that happens depends on the model, the hardware and the
prompts, so the cap is calibrated on the first requests: start small, and double the cap while doubling raises
tokens/s by at least GAIN, within the memory budget. Each cap is measured over WINDOW steps at full occupancy
(every row busy and requests waiting), with the admission of new rows (their prefill) counted in. Its first
WARMUP saturated steps are not counted: they fill the new rows at once, and they are where the speculation
controller learns the costs of a row count it has not seen (controller.py); counted in, they would price every
larger cap below what it decodes at once settled. It starts at START rows (or what the budget allows): small
batches are rarely what a throughput job wants, and every window spent below the best cap costs throughput.

The budget is in cache slots (one token of one row), and a slot's bytes differ by model: a LLaVA-1.5-7B slot
holds 512 KiB of keys and values, a tiny demo model's a few KiB. So the slots a configured budget names are
also bounded by memory: KV_MEMORY_SHARE of what is free when the engine starts, over the bytes per slot of the
target and the draft together. Rows with thousands of image tokens or long outputs need many slots each, so
they get a smaller cap than short rows, under either bound.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

START, LIMIT = 64, 1024
WINDOW = 32  # steps per measurement: about one output's length, so that rows finish and join within it
WARMUP = 4  # saturated steps at a new cap before its measurement starts
GAIN = 1.03
# Of the memory free at start, the share the caches may take: the rest holds activations of the widest step
# (a prefill of many image tokens, the verification window's logits) and the allocator's fragmentation.
KV_MEMORY_SHARE = 0.5


def kv_bytes_per_slot(model: torch.nn.Module) -> int:
    """Bytes of keys and values one cache slot takes across the model's layers."""
    text = getattr(model.config, "text_config", None) or model.config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    element = next(model.parameters()).element_size()
    return 2 * text.num_hidden_layers * kv_heads * head_dim * element


def free_memory(device: torch.device) -> int:
    """Bytes free on the device now: the GPU's, or the host's available memory for a CPU engine."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def slot_budget(configured: int | None, bytes_per_slot: int, free: int) -> int:
    """Cache slots the running batch may hold: the configured budget, within KV_MEMORY_SHARE of `free` bytes."""
    fit = max(1, int(free * KV_MEMORY_SHARE) // bytes_per_slot)
    return fit if configured is None else min(configured, fit)


@dataclass
class AutoRows:
    cap: int = START
    limit: int = LIMIT  # rows the memory budget allows
    settled: bool = False
    rates: dict[int, float] = field(default_factory=dict)  # cap -> tokens/s measured
    _tokens: int = 0
    _seconds: float = 0.0
    _steps: int = 0
    _warmup: int = WARMUP

    def observe(self, rows: int, waiting: bool, tokens: int, seconds: float) -> None:
        """After a step (admission included) over `rows` rows that committed `tokens` in `seconds`."""
        self.cap = min(self.cap, self.limit)
        if self.settled:
            return
        if rows < self.cap or not waiting:
            return  # not saturated: the cap is not what limits this step
        if self._warmup > 0:
            self._warmup -= 1
            return
        self._tokens += tokens
        self._seconds += seconds
        self._steps += 1
        if self._steps < WINDOW:
            return
        self.rates[self.cap] = self._tokens / self._seconds
        self._tokens, self._seconds, self._steps, self._warmup = 0, 0.0, 0, WARMUP
        best = max(self.rates, key=self.rates.get)
        if (
            best == self.cap
            and self.cap * 2 <= self.limit
            and self.rates[best] > GAIN * self.rates.get(self.cap // 2, 0)
        ):
            self.cap *= 2
        else:
            self.cap, self.settled = best, True

    def describe(self) -> dict:
        return {"rows": self.cap, "settled": self.settled, "tokens_per_s_by_rows": dict(sorted(self.rates.items()))}
