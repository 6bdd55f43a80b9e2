"""make_demo: the demo model family from nothing, deterministically.

    tokenizer -> target (trained on world scenes, seed 0) -> the target's outputs on training scenes, all three
    tasks, as the pipeline writes them -> text-only draft (pretrain on world text, distill on the outputs)
    -> VLM draft (the text draft's LM on the target's frozen vision tower, distilled on the outputs)
    -> <out_dir>/{target, draft-text, draft-vlm}

Every stage resumes: training stages from their checkpoints in the work directory, the output step by skipping
shards already written. Held-out evaluation uses seed 1, which no stage trains on.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specvlm.data.prompts import TASKS
from specvlm.demo.quality import evaluate
from specvlm.demo.shards import write_webdataset_shards
from specvlm.demo.target import DEMO_TARGET, train_target
from specvlm.demo.tokenizer import DEMO_VOCAB_SIZE, TOKENIZER_SCENES, build_demo_tokenizer
from specvlm.demo.world import corpus_lines
from specvlm.engine import DraftSettings
from specvlm.models.build import LlavaShape
from specvlm.models.loading import load_target
from specvlm.training.draft import DraftShape, train_draft
from specvlm.training.loop import TrainConfig

# The world's metadata keeps the open question under "question" and the multiple-choice one under "mc_question"
# (configs/demo-mc.yaml maps it the same way).
MC_FIELDS = {"question": "mc_question", "answer": "answer_index"}


@dataclass(frozen=True)
class DemoPlan:
    out_dir: Path = Path("assets/demo/models")
    work_dir: Path = Path("out/make_demo")
    seed: int = 0
    vocab_size: int = DEMO_VOCAB_SIZE
    tokenizer_scenes: int = TOKENIZER_SCENES
    target_shape: LlavaShape = DEMO_TARGET
    vision: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300, lr=3e-3, warmup=50))
    target: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=3000, lr=1.5e-3, warmup=100, checkpoint_every=250)
    )
    # Then everything, vision tower included, on fresh scenes with more questions each (target.train_target).
    target_finetune: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=4000, lr=3e-4, warmup=50, checkpoint_every=250)
    )
    scenes_per_step: int = 8  # each gives a caption, a multiple-choice and vqa_per_scene question examples
    vqa_per_scene: int = 3
    finetune_vqa_per_scene: int = 8
    distill_scenes: int = 2000  # training scenes whose target outputs (x 3 tasks) the drafts learn from
    shard_size: int = 250
    pretrain_scenes: int = 4000  # world text lines (x 3 per scene) for the text draft's stage 1
    draft_shape: DraftShape = field(default_factory=DraftShape)
    text_pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(steps=600, lr=3e-3, warmup=50))
    text_distill: TrainConfig = field(default_factory=lambda: TrainConfig(steps=800, lr=2e-3, warmup=50))
    vlm_distill: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1200, lr=2e-3, warmup=50))
    draft_batch_size: int = 32
    max_new_tokens: int = 128
    dtype: torch.dtype = torch.float32  # of the saved weights
    eval_scenes: int = 0  # held-out scenes for a quality table at the end (0: skip)


def _shards(plan: DemoPlan) -> str:
    """The training scenes as WebDataset shards (what a user's data would be); returns their glob."""
    root = plan.work_dir / "shards"
    count = math.ceil(plan.distill_scenes / plan.shard_size)
    if len(list(root.glob("*.tar"))) != count:
        write_webdataset_shards(str(root), seed=plan.seed, num_shards=count, per_shard=plan.shard_size)
    return f"{root}/*.tar"


def distillation_outputs(target_dir: Path, plan: DemoPlan, log=print) -> list[str]:
    """The target's greedy outputs on the training shards for every task; returns their globs.

    Made by the pipeline itself (`run_job` on a local Ray), so the drafts learn from exactly what a user's
    caption / vqa / mc jobs write, and a rerun skips the shards already written.
    """
    import ray

    from pipeline.config import load_config
    from pipeline.job import run_job

    shards = _shards(plan)
    started_ray = not ray.is_initialized()
    globs = []
    for task in TASKS:
        out = plan.work_dir / "outputs" / task
        overrides = [
            f"input.uri={shards}",
            f"output.uri={out}",
            f"task.kind={task}",
            f"model.target={target_dir}",
            "model.dtype=float32",
            "draft.kind=none",
            f"decode.max_new_tokens={plan.max_new_tokens}",
            "compute.batch_size=16",
            "output.max_error_fraction=0",
        ]
        if task == "mc":
            overrides += [f"input.fields.{name}={source}" for name, source in MC_FIELDS.items()]
        run_job(load_config(None, overrides), log=log)
        globs.append(f"{out}/*.parquet")
    if started_ray:
        ray.shutdown()  # its idle workers would hold memory through draft training
    return globs


@contextlib.contextmanager
def _stage(name: str, timings: dict[str, float], log):
    log(f"== {name}")
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    log(f"== {name}: {timings[name]:.0f} s")


def make_demo(plan: DemoPlan, log=print) -> dict[str, float]:
    """Run every stage; returns seconds per stage."""
    out, work = Path(plan.out_dir), Path(plan.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    with _stage("tokenizer", timings, log):
        tokenizer = build_demo_tokenizer(plan.vocab_size, plan.tokenizer_scenes, plan.seed)
        log(f"{len(tokenizer)} tokens")
    with _stage("target", timings, log):
        train_target(
            tokenizer,
            out / "target",
            work / "target",
            plan.target,
            vision=plan.vision,
            finetune=plan.target_finetune,
            shape=plan.target_shape,
            scenes_per_step=plan.scenes_per_step,
            vqa_per_scene=plan.vqa_per_scene,
            finetune_vqa_per_scene=plan.finetune_vqa_per_scene,
            seed=plan.seed,
            dtype=plan.dtype,
        )
    with _stage("target outputs", timings, log):
        outputs = distillation_outputs(out / "target", plan, log)
    pretrain_text = work / "pretrain.txt"
    pretrain_text.write_text("".join(f"{line}\n" for line in corpus_lines(plan.seed, plan.pretrain_scenes)))
    common = dict(
        target=str(out / "target"),
        outputs=outputs,
        shape=plan.draft_shape,
        batch_size=plan.draft_batch_size,
        seed=plan.seed,
        dtype=plan.dtype,
        log=log,
    )
    with _stage("text draft", timings, log):
        train_draft(
            kind="text",
            out_dir=out / "draft-text",
            work_dir=work / "draft-text",
            text_files=[str(pretrain_text)],
            pretrain=plan.text_pretrain,
            distill=plan.text_distill,
            **common,
        )
    with _stage("vlm draft", timings, log):
        train_draft(
            kind="vlm",
            out_dir=out / "draft-vlm",
            work_dir=work / "draft-vlm",
            init=str(out / "draft-text"),
            distill=plan.vlm_distill,
            **common,
        )
    if plan.eval_scenes:
        with _stage("evaluation", timings, log):
            target = load_target(str(out / "target"), device="cpu", dtype="float32")
            drafts = {kind: DraftSettings(kind, str(out / f"draft-{kind}")) for kind in ("text", "vlm")}
            log(evaluate(target, drafts, scenes=plan.eval_scenes).table())
    log("stage times: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items()))
    return timings
