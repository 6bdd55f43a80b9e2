"""The demo family as the engine-level benchmarks load it: the shipped target on the CPU in float32, its VLM
draft, and requests made from world scenes of a seed the demo models never trained on.

One loader, so that the compile, controller and throughput benchmarks measure the same target on the same kind
of requests, and a change to how the demo world is asked (prompts, held-out seed) reaches all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from specvlm.demo import ASSETS
from specvlm.demo.quality import scene_requests
from specvlm.demo.world import make_scene
from specvlm.engine import DraftSettings, build_draft
from specvlm.models.loading import LoadedTarget, load_target
from specvlm.specdec.decode import generation_eos
from specvlm.specdec.drafts import Draft
from specvlm.specdec.requests import Request

DEMO_MODELS = ASSETS / "models"  # target/, draft-vlm/, draft-text/
HELD_OUT_SEED = 3  # the demo family trained on seed 0 and is evaluated on seeds 1 and 2


def world_requests(processor, count: int, tasks=("caption",), seed: int = HELD_OUT_SEED) -> list[Request]:
    """`count` held-out scenes, cycling through `tasks` (so a mixed workload alternates them)."""
    requests = []
    for i in range(count):
        task = tasks[i % len(tasks)]
        requests += scene_requests([make_scene(seed, i)], task, processor)
    return requests


@dataclass
class DemoFamily:
    target: LoadedTarget
    models: Path

    @property
    def eos(self) -> tuple[int, ...]:
        return generation_eos(self.target.model)

    def requests(self, count: int, tasks=("caption",)) -> list[Request]:
        return world_requests(self.target.processor, count, tasks)

    def vlm_draft(self, **changes) -> Callable[[], Draft]:
        """Makes a fresh VLM draft each call (a draft holds per-run state); changes: DraftSettings fields."""
        return lambda: build_draft(DraftSettings("vlm", str(self.models / "draft-vlm"), **changes), self.target)


def load_demo_family(models: Path = DEMO_MODELS, threads: int | None = None) -> DemoFamily:
    """threads: torch threads (None or 0: torch's choice)."""
    hf_logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
    return DemoFamily(load_target(str(models / "target"), device="cpu", dtype="float32"), models)
