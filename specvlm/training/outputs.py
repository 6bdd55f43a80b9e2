"""Distillation examples from a target's outputs: the Parquet the caption / vqa / mc jobs write (OUTPUT_SCHEMA),
joined on (source, key) with the input shards it names for the images.

A draft learns to continue exactly what the target generated (self-data distillation, MASSV; Gagrani, Goel et al. tune
its drafts on the target's task data): the input is the prompt the target saw, the loss is on output_ids.
  text-only draft: the prompt's token ids with the image placeholders removed, as the engine feeds it;
  VLM draft:       the prompt and the image through the target's processor, exactly as the pipeline does.
"""

from __future__ import annotations

from collections import defaultdict

import fsspec
import pyarrow.parquet as pq
import torch

from specvlm.data.images import decode_image
from specvlm.data.sources import list_shards, read_shard
from specvlm.models.loading import ModelLoadError
from specvlm.specdec.drafts import strip_image_tokens
from specvlm.training.examples import Example

COLUMNS = ("key", "source", "task", "prompt", "text", "output_ids", "error")


class OutputsError(ValueError):
    """Output files that cannot be used for distillation; the message says why and what to do."""


def _output_files(uri: str, storage_options: dict) -> list[tuple]:
    """(filesystem, path) of every Parquet file a URI names: a file, a glob, or a job's output directory."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    if any(c in path for c in "*?["):
        paths = fs.glob(path)
    elif fs.isdir(path):
        paths = fs.glob(path.rstrip("/") + "/*.parquet")
    else:
        paths = [path] if fs.exists(path) else []
    if not paths:
        raise OutputsError(f"{uri} names no output files")
    return [(fs, p) for p in sorted(paths)]


def read_outputs(uris: list[str], storage_options: dict | None = None) -> list[dict]:
    """The usable rows (no error, some output) of every output file the URIs name, in file order."""
    files = [f for uri in uris for f in _output_files(uri, storage_options or {})]
    rows = []
    for fs, path in files:
        with fs.open(path, "rb") as handle:
            names = pq.read_schema(handle).names
            missing = [c for c in COLUMNS if c not in names]
            if missing:
                raise OutputsError(f"{path} lacks columns {missing}: it is not the output of a caption/vqa/mc job")
            handle.seek(0)
            table = pq.read_table(handle, columns=list(COLUMNS))
        rows += [r for r in table.to_pylist() if r["error"] is None and r["output_ids"] and r["prompt"]]
    if not rows:
        raise OutputsError(f"no usable rows (all failed or empty) in {len(files)} output files")
    return rows


def check_tokenizer(rows: list[dict], tokenizer, target: str) -> None:
    """The output ids must decode to the rows' text with this target's tokenizer, or they came from another."""
    for row in rows:
        ids = row["output_ids"]
        if max(ids) >= len(tokenizer) or " ".join(tokenizer.decode(ids, skip_special_tokens=True).split()) != " ".join(
            (row["text"] or "").split()
        ):
            raise ModelLoadError(
                f"the outputs were not generated with the tokenizer of target {target!r}: row {row['key']!r} of "
                f"{row['source']} has output_ids that do not decode to its text; train the draft with the target "
                "that wrote these outputs"
            )


def text_examples(rows: list[dict], tokenizer, image_token_id: int | None) -> list[Example]:
    examples = []
    for row in rows:
        prompt = strip_image_tokens(tokenizer(row["prompt"]).input_ids, image_token_id)
        examples.append(Example(prompt + list(row["output_ids"]), len(prompt)))
    return examples


def _shards_of(source: str, storage_options: dict | None):
    # A tar or Parquet source is one shard file; an image-folder source is the folder that was listed.
    is_file = source.lower().endswith((".tar", ".parquet"))
    return list_shards(source, "auto" if is_file else "images", storage_options=storage_options)


def load_images(rows: list[dict], storage_options: dict | None = None) -> dict[tuple[str, str], bytes]:
    """(source, key) -> image bytes for every row, read back from the input shards the rows name."""
    wanted = defaultdict(set)
    for row in rows:
        wanted[row["source"]].add(row["key"])
    images = {}
    for source, keys in wanted.items():
        for shard in _shards_of(source, storage_options):
            for record in read_shard(shard, storage_options=storage_options):
                if record["key"] in keys and record["image"] is not None:
                    images[(source, record["key"])] = record["image"]
        lost = sorted(keys - {k for s, k in images if s == source})
        if lost:
            raise OutputsError(
                f"{len(lost)} keys (e.g. {lost[0]!r}) were not found in their input shard {source}; "
                "the input shards must still be readable where the job read them"
            )
    return images


def vlm_examples(rows: list[dict], processor, images: dict[tuple[str, str], bytes]) -> list[Example]:
    examples = []
    for row in rows:
        image = decode_image(images[(row["source"], row["key"])])
        encoded = processor(images=image, text=row["prompt"], return_tensors="pt")
        prompt = encoded["input_ids"][0].tolist()
        examples.append(Example(prompt + list(row["output_ids"]), len(prompt), encoded["pixel_values"]))
    return examples


class Shuffled:
    """batches(step) over a fixed list: a fresh permutation every epoch, a pure function of (seed, step)."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int = 0):
        if not examples:
            raise ValueError("no training examples")
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.examples), generator=generator).tolist()}
        return self._orders[epoch]

    def __call__(self, step: int) -> list[Example]:
        n = len(self.examples)
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        return [self.examples[self._order(p // n)[p % n]] for p in positions]
