"""The demo benchmarks' one loader: the shipped target, held-out requests, and a fresh VLM draft per call."""

import torch

from specvlm.demo.quality import scene_requests
from specvlm.demo.world import make_scene
from specvlm.evaluation.demo_family import HELD_OUT_SEED, load_demo_family


def test_demo_family_loads_the_target_held_out_scenes_and_fresh_drafts():
    threads = torch.get_num_threads()
    try:
        family = load_demo_family(threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)  # the rest of the session keeps its threads
    assert family.target.model.dtype == torch.float32 and family.target.model.device.type == "cpu"
    assert family.eos == (family.target.tokenizer.eos_token_id,)
    mixed = family.requests(3, tasks=("vqa", "caption"))
    for index, task in enumerate(("vqa", "caption", "vqa")):
        (expected,) = scene_requests([make_scene(HELD_OUT_SEED, index)], task, family.target.processor)
        assert mixed[index].input_ids == expected.input_ids
        assert torch.equal(mixed[index].pixel_values, expected.pixel_values)
    make = family.vlm_draft(gamma=3)
    first, second = make(), make()
    assert first is not second and first.max_depth == second.max_depth == 3
