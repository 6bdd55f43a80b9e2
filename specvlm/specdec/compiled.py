"""Compiled decode forwards (`compute.compile`): torch.compile of the target's and the draft's DecodeForward.

What is compiled is the device half of a forward (runner.DecodeForward: masks from committed lengths, then the
model), with fullgraph=True: nothing in it reads the device, so there is no graph break, and on a GPU the whole
forward can be replayed as a CUDA graph. Prompt forwards (admission's prefill, over image embeddings or tokens) are
compiled apart, without CUDA graphs: every admission has its own prompt lengths, so they run at their exact shape.

    CPU: inductor, with freezing (weights become constants, prepacked for oneDNN's matrix kernels) and dynamic
         shapes, so one graph serves every row count, window and read length: shapes stay exact (shapes.py).
    GPU: mode="reduce-overhead": each shape a forward meets is recorded once as a CUDA graph and replayed, which
         takes the kernel launches and the Python off the step; shapes are bucketed so that few are recorded,
         and the cache buffers keep fixed addresses.

A forward is compiled once per model and kept on the model, so decoders rebuilt after a failure, or several in
one process, reuse it. Compiling costs time (seconds to a minute per graph on a small CPU), paid at the first
steps; the warm-up time is reported. Anything that goes wrong while compiling or running compiled code (an
operator the backend lacks, a model whose forward breaks the graph) falls back to the eager forward, with one
warning, and the job goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

# Graphs one forward may hold: a process that decodes with several models (tests, evaluations) compiles the
# same function once per model, which dynamo counts as recompilations of it.
RECOMPILE_LIMIT = 64


def cuda_graphs(device: torch.device) -> bool:
    """Whether compiled forwards on this device replay CUDA graphs (and so need bucketed shapes)."""
    return device.type == "cuda"


class StepCompiler:
    """Compiles decode forwards for one device; keeps what compiling cost and whether it fell back."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0  # spent in calls that compiled a graph (the warm-up)
        self.graphs = 0
        self.failure: str | None = None

    def wrap(self, forward: Callable, role: str, prompt: bool = False) -> Callable:
        """The compiled form of `forward` (a DecodeForward), shared by every runner of the same model. prompt: the
        form prompt forwards run (exact shapes, never CUDA graphs)."""
        owner = forward.model
        cache = owner.__dict__.setdefault("_specvlm_compiled", {})
        key = (role, forward.lean is not None, forward.float32_head, prompt)
        if key not in cache:
            cache[key] = _Compiled(forward, self.device, graphs=cuda_graphs(self.device) and not prompt)
        compiled = cache[key]
        if self not in compiled.reporters:
            compiled.reporters.append(self)
        return compiled

    def describe(self) -> dict:
        return {
            "enabled": self.failure is None,
            "backend": "inductor, CUDA graphs" if cuda_graphs(self.device) else "inductor (CPU), frozen weights",
            "graphs": self.graphs,
            "warm_up_seconds": round(self.seconds, 3),
            "fell_back_to_eager": self.failure,
        }


class _Compiled:
    def __init__(self, forward: Callable, device: torch.device, graphs: bool):
        self.eager = forward
        self.failure: str | None = None
        self.reporters: list[StepCompiler] = []
        if graphs:
            options = dict(mode="reduce-overhead")
        elif device.type == "cpu":
            options = dict(options={"freezing": True})
        else:
            options = {}
        self.compiled = torch.compile(forward.__call__, fullgraph=True, dynamic=True, **options)
        _configure_dynamo()

    @property
    def model(self):
        return self.eager.model

    @property
    def lean(self):
        return self.eager.lean

    def __call__(self, *args):
        if self.failure is not None:
            return self.eager(*args)
        graphs = _graphs()
        start = time.perf_counter()
        try:
            out = self.compiled(*args)
        except Exception as exc:  # any failure of the compiler stack: decode eagerly, never fail the job
            self._fall_back(exc)
            return self.eager(*args)
        new = _graphs() - graphs
        if new:
            for reporter in self.reporters:
                reporter.graphs += new
                reporter.seconds += time.perf_counter() - start
        return out

    def _fall_back(self, exc: Exception) -> None:
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        self.failure = f"{type(exc).__name__}: {first_line}"
        log.warning("compiled decoding failed, decoding eagerly instead (%s)", self.failure)
        for reporter in self.reporters:
            reporter.failure = self.failure


def _configure_dynamo() -> None:
    """Settings the compiler reads when it compiles, set for the process rather than patched around each call:
    entering and leaving a config patch costs about half a millisecond, more than a small forward's kernels.
    Sizes that happen to be equal at the first call (rows of the batch and of the cache) stay distinct symbols (no
    "duck" shapes), or the next batch of other proportions would compile again. A size of 1 is a constant (a
    one-token forward is a graph of its own; the runner pads rows to 2, see runner.py)."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
    torch.fx.experimental._config.use_duck_shape = False


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]
