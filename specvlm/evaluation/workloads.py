"""Workloads whose rows need many cache slots each, for the throughput benchmark (jobs/workload_benchmark.py):

- long outputs: detailed captions of 200-400 tokens (LLaVA-NeXT-style captioners average about 200). The demo
  models learned captions of at most 61 tokens, so no prompt makes them talk that long; the benchmark ignores EOS
  and gives each request a fixed length between 200 and 400 instead. The tokens past the demo model's natural end
  are what it predicts out of its training distribution: the draft's acceptance there says little about a real
  captioner, but the memory and the batch a row of that length takes are those of a real long caption.
- anyres images: LLaVA-NeXT splits a large image into crops and adds a downscaled view, thousands of image tokens
  per row (LLaVA-NeXT-7B: up to 2,880). A tiny random NeXT target on the demo tokenizer, with crops of 256 tokens
  on grids up to 3x3, gives rows of about 1,000 to 2,600 image tokens. Its draft is a truncated copy of the
  target (the target's vision tower and projector, its first language-model layer; see DAMPING): a random pair
  would accept nothing, and the copy agrees with the target often, which is what a trained draft does. Its
  acceptance is made, not learned: the anyres workload measures memory and the batch, not a draft.

Peak memory is measured per run: on a GPU the allocator's peak; on a CPU the process's resident set, sampled by
a thread, because the kernel keeps only the process's lifetime peak (ru_maxrss), which an earlier, larger run
would mask.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import os
import threading
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from specvlm.data.prompts import instruction, render
from specvlm.demo.world import make_scene
from specvlm.demo.world_data import scene_questions
from specvlm.evaluation.demo_family import HELD_OUT_SEED, world_requests
from specvlm.specdec.requests import Request

LONG_OUTPUT = (200, 400)  # new tokens per row, spread evenly over the requests
CROP = 64  # pixels per crop side; patches of 4 pixels make 256 image tokens per crop
GRID = [[CROP * h, CROP * w] for h in (1, 2, 3) for w in (1, 2, 3) if (h, w) != (1, 1)]
# Scene sizes (height, width), cycled: square, wide and tall images land on different crop grids.
ANYRES_SIZES = ((192, 192), (128, 192), (192, 128), (160, 160), (96, 192))
# Random layers at full scale make a random function of the whole stack, which no truncation predicts (a truncated
# copy then accepts about 1 token in 30). Scaled by this, the first layer alone predicts the target's next token
# about 4 times in 5 at depth 4: the agreement a trained draft has, at a third of the target's cost.
DAMPING = 0.1


def long_output_requests(processor, count: int) -> list[Request]:
    """Held-out caption requests, each with its own output length in LONG_OUTPUT (run them with EOS ignored)."""
    low, high = LONG_OUTPUT
    requests = world_requests(processor, count)
    for i, request in enumerate(requests):
        request.max_new_tokens = low + (high - low) * i // max(count - 1, 1)
    return requests


def build_anyres_models(tokenizer, root: Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny random LLaVA-NeXT target and its truncated copy as a VLM draft, saved under `root` as a downloaded
    checkpoint is (target/ with its processor, draft/ with the tokenizer); returns their folders."""
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=CROP, patch_size=4
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=GRID,
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    target = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():  # the layers past the first write little into the residual stream: see DAMPING
        for layer in target.model.language_model.layers[1:]:
            layer.self_attn.o_proj.weight.mul_(DAMPING)
            layer.mlp.down_proj.weight.mul_(DAMPING)
    truncated = copy.deepcopy(config)
    truncated.text_config.num_hidden_layers = 1
    draft = LlavaNextForConditionalGeneration(truncated).eval()
    draft.load_state_dict(target.state_dict(), strict=False)  # the layers beyond the first are left out
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP}, image_grid_pinpoints=GRID
        ),
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    folders = root / "target", root / "draft"
    target.save_pretrained(folders[0])
    processor.save_pretrained(folders[0])
    draft.save_pretrained(folders[1])
    tokenizer.save_pretrained(folders[1])
    return folders


def anyres_requests(processor, count: int, seed: int = HELD_OUT_SEED) -> list[Request]:
    """Caption requests about held-out scenes drawn large, in ANYRES_SIZES, as LLaVA-NeXT's processor crops them."""
    prompt = render(instruction("caption", {}), processor)
    return [_anyres_request(processor, _anyres_scene(seed, i)[1], prompt) for i in range(count)]


def anyres_question_requests(processor, images: int, questions: int, seed: int = HELD_OUT_SEED) -> list[Request]:
    """`questions` questions about each of `images` held-out scenes drawn large (the scene's own and others it
    answers), the questions about one image next to each other, as a VQAv2-style layout lists them."""
    requests = []
    for i in range(images):
        scene, image = _anyres_scene(seed, i)
        for question, _ in scene_questions(scene, questions):
            prompt = render(instruction("vqa", {"question": question}), processor)
            requests.append(_anyres_request(processor, image, prompt))
    return requests


def _anyres_scene(seed: int, index: int):
    """Scene `index` and its image at its size in ANYRES_SIZES."""
    height, width = ANYRES_SIZES[index % len(ANYRES_SIZES)]
    scene = make_scene(seed, index, image_size=max(height, width))
    return scene, scene.image.resize((width, height))


def _anyres_request(processor, image, prompt: str) -> Request:
    encoded = processor(images=image, text=prompt, return_tensors="pt")
    return Request(encoded.input_ids[0].tolist(), encoded.pixel_values, image_sizes=encoded.image_sizes)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_heap() -> None:
    """Hand freed heap back to the system (glibc keeps it otherwise), so a run's peak starts from what is live."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the peak includes heap freed before
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Bytes a block of code adds at its peak, over what was in use when it started:

    with PeakMemory() as peak:
        run()
    peak.added, peak.peak
    """

    INTERVAL = 0.005  # seconds between resident-set samples on a CPU

    def __init__(self, device: torch.device | None = None):
        self.cuda = device is not None and device.type == "cuda"
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            self.peak = max(self.peak, _resident_bytes())

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            _release_free_heap()
            self.start = _resident_bytes()
            self._thread.start()
        self.peak = self.start
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _resident_bytes())

    @property
    def added(self) -> int:
        return self.peak - self.start
