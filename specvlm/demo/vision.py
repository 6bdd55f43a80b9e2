"""Stage 0 of the demo target: pretraining its vision tower to read the world's cells.

A real LLaVA starts from a pretrained CLIP; ours starts from nothing, and learning to see through the language
loss alone is slow on a CPU: after 1000 steps the target still described every image alike (the language prior).
So, like CLIP pretraining before LLaVA, the tower first learns on its own from labelled images: linear heads
read each of the 9 image tokens the LM will get (the features of `vision_feature_layer`, CLS dropped) and
predict that cell's colour, shape and size (or empty) and which cell it is, and the mean token predicts the
background. The heads are thrown away, the tower is frozen, and the LM learns to read it in a few hundred steps.

The weights of the heads come from measurements (held-out, teacher-forced, 500-1000 LLaVA steps):
  - without the cell head, the LM must work out where an image token sits from its sequence position alone;
    attention values carry no position, so "where is the red square?" stayed ~50% wrong for 3000 steps;
  - with a full-weight cell head the LM never learned to read sizes (always "large"): the position, which the
    tower can make as loud as it likes through its position embeddings, drowned the subtler size feature;
  - a light cell head (weight 0.2, label smoothing) and a heavier size head (3) give both.
"""

from __future__ import annotations

import torch
from torch import nn

from specvlm.demo.world import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, Scene, make_scene
from specvlm.demo.world_data import IMAGE_SIZES

# Class 0 of every cell attribute is "empty cell".
ATTRIBUTES = {"colour": ("",) + tuple(COLOURS), "shape": ("",) + SHAPES, "size": ("",) + SIZES}
WEIGHTS = {"colour": 1.0, "shape": 1.0, "size": 3.0, "cell": 0.2, "background": 1.0}  # see the module docstring
CELL_LABEL_SMOOTHING = 0.1


def cell_labels(scene: Scene) -> tuple[torch.Tensor, int]:
    """[9, 3] class per cell and attribute (colour, shape, size; 0 = empty cell), and the background's class."""
    labels = torch.zeros(len(POSITIONS), len(ATTRIBUTES), dtype=torch.long)
    for obj in scene.objects:
        cell = POSITIONS.index(obj.position)
        for a, (name, classes) in enumerate(ATTRIBUTES.items()):
            labels[cell, a] = classes.index(getattr(obj, name))
    return labels, list(BACKGROUNDS).index(scene.background)


class CellReader(nn.Module):
    """The target's vision tower plus throwaway linear heads over the image tokens the LM will receive."""

    def __init__(self, target: nn.Module):
        super().__init__()
        config = target.config
        self.tower = target.model.vision_tower
        self.layer = config.vision_feature_layer
        self.drop_cls = config.vision_feature_select_strategy == "default"
        hidden = config.vision_config.hidden_size
        self.heads = nn.ModuleList(nn.Linear(hidden, len(classes)) for classes in ATTRIBUTES.values())
        self.cell = nn.Linear(hidden, len(POSITIONS))
        self.background = nn.Linear(hidden, len(BACKGROUNDS))

    def forward(self, pixel_values: torch.Tensor, cells: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
        """The weighted loss of every head."""
        features = self.tower(pixel_values, output_hidden_states=True).hidden_states[self.layer]  # [B, 1+9, H]
        if self.drop_cls:
            features = features[:, 1:]
        n, cells_per_image = features.shape[:2]
        targets = [cells[:, :, a] for a in range(len(ATTRIBUTES))]
        targets.append(torch.arange(cells_per_image, device=features.device).expand(n, -1))  # which cell
        loss = 0.0
        for name, head, target in zip([*ATTRIBUTES, "cell"], [*self.heads, self.cell], targets):
            logits = head(features)  # [B, 9, classes]
            smoothing = CELL_LABEL_SMOOTHING if name == "cell" else 0.0
            loss = loss + WEIGHTS[name] * nn.functional.cross_entropy(
                logits.flatten(0, 1), target.flatten(), label_smoothing=smoothing
            )
        logits = self.background(features.mean(1))
        loss = loss + WEIGHTS["background"] * nn.functional.cross_entropy(logits, background)
        return loss


class SceneImages:
    """batches(step) -> labelled scenes, a pure function of the step (like world_data.WorldBatches)."""

    def __init__(self, seed: int, per_step: int, first_index: int = 0):
        self.seed, self.per_step, self.first_index = seed, per_step, first_index

    def __call__(self, step: int) -> list[Scene]:
        start = self.first_index + step * self.per_step
        return [
            make_scene(self.seed, i, IMAGE_SIZES[i % len(IMAGE_SIZES)]) for i in range(start, start + self.per_step)
        ]


def cell_step(image_processor):
    """A loop.train step_fn for CellReader: pixels through the target's own image processor, then the heads."""

    def step(reader: CellReader, scenes: list[Scene]) -> float:
        device = next(reader.parameters()).device
        pixels = image_processor(images=[s.image for s in scenes], return_tensors="pt")["pixel_values"]
        labels = [cell_labels(s) for s in scenes]
        loss = reader(
            pixels.to(device),
            torch.stack([c for c, _ in labels]).to(device),
            torch.tensor([b for _, b in labels], device=device),
        )
        loss.backward()
        return loss.item()

    return step
