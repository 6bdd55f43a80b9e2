"""The demo family: a procedural image world with exact captions and answers, and the models trained on it.

world.py       scenes: shapes, colours, sizes, positions, counts, backgrounds, and their exact text
shards.py      scenes written as input shards (WebDataset tars or Parquet)
tokenizer.py   the demo tokenizer and the LLaVA-1.5 chat template
world_data.py  target training examples from the world, made on the fly
vision.py      stage 0 of the demo target: its vision tower learns to read the world's cells
target.py      the demo target: shape, build, train, save
quality.py     the demo family's accuracy and per-word acceptance on held-out world scenes (through the engine)
make.py        make_demo: every stage, from an empty directory to the shipped checkpoints
cli.py         the command line of jobs/make_demo
"""

from pathlib import Path

# The shipped demo models and shards, found from this package so that jobs work from any directory.
ASSETS = Path(__file__).resolve().parents[2] / "assets" / "demo"
