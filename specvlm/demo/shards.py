"""Write procedural scenes as input shards: WebDataset tars (img2dataset layout) or Parquet.

Shard i holds the scenes start_index + i * per_shard ... start_index + (i + 1) * per_shard - 1,
so another seed or start_index gives a held-out set. Output goes through fsspec, so
out_dir_or_uri may be a local path or any URI fsspec opens (s3://, gs://, memory://).
The same arguments always give the same bytes.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import asdict

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from specvlm.demo.world import Scene, make_scene

_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG"}

PARQUET_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("image", pa.binary()),
        ("caption", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("mc_question", pa.string()),
        ("choices", pa.list_(pa.string())),
        ("answer_index", pa.int32()),
        ("reasoning", pa.string()),
    ]
)


def encode_image(scene: Scene, image_format: str) -> bytes:
    buffer = io.BytesIO()
    # Full-resolution chroma and high quality keep JPEG colours close to the flat originals.
    options = {"quality": 95, "subsampling": 0} if image_format == "jpg" else {}
    scene.image.save(buffer, format=_PIL_FORMATS[image_format], **options)
    return buffer.getvalue()


def scene_metadata(scene: Scene) -> dict:
    """Everything known about a scene except its pixels, as JSON-ready values."""
    return {
        "key": scene.key,
        "caption": scene.caption,
        "question": scene.question,
        "answer": scene.answer,
        "mc_question": scene.mc_question,
        "choices": list(scene.choices),
        "answer_index": scene.answer_index,
        "reasoning": scene.reasoning,
        "background": scene.background,
        "objects": [asdict(o) for o in scene.objects],
    }


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata instead of the writer's clock and user, so the bytes are reproducible.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _write_tar(f, scenes: Iterator[Scene], image_format: str) -> None:
    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for scene in scenes:
            _tar_member(tar, f"{scene.key}.{image_format}", encode_image(scene, image_format))
            _tar_member(tar, f"{scene.key}.txt", scene.caption.encode())
            _tar_member(tar, f"{scene.key}.json", json.dumps(scene_metadata(scene), sort_keys=True).encode())


def _write_parquet(f, scenes: Iterator[Scene], image_format: str) -> None:
    rows = [
        {
            **{k: v for k, v in scene_metadata(scene).items() if k in PARQUET_SCHEMA.names},
            "image": encode_image(scene, image_format),
        }
        for scene in scenes
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA), f)


def _write_shards(
    write: Callable,
    suffix: str,
    out_dir_or_uri: str,
    *,
    seed: int,
    num_shards: int,
    per_shard: int,
    image_size: int,
    image_format: str,
    start_index: int,
    storage_options: dict | None,
) -> list[str]:
    if image_format not in _PIL_FORMATS:
        raise ValueError(f"image_format must be one of {sorted(_PIL_FORMATS)}, got {image_format!r}")
    storage_options = storage_options or {}
    fs, root = fsspec.core.url_to_fs(out_dir_or_uri, **storage_options)
    fs.makedirs(root, exist_ok=True)
    uris = []
    for i in range(num_shards):
        first = start_index + i * per_shard
        scenes = (make_scene(seed, index, image_size) for index in range(first, first + per_shard))
        uri = f"{out_dir_or_uri.rstrip('/')}/{i:05d}.{suffix}"
        with fsspec.open(uri, "wb", **storage_options) as f:
            write(f, scenes, image_format)
        uris.append(uri)
    return uris


def write_webdataset_shards(
    out_dir_or_uri: str,
    *,
    seed: int,
    num_shards: int,
    per_shard: int,
    image_size: int = 64,
    image_format: str = "png",
    start_index: int = 0,
    storage_options: dict | None = None,
) -> list[str]:
    """Write `{i:05d}.tar` shards with `{key}.png|jpg`, `{key}.txt` (caption), `{key}.json`; return their URIs."""
    return _write_shards(
        _write_tar,
        "tar",
        out_dir_or_uri,
        seed=seed,
        num_shards=num_shards,
        per_shard=per_shard,
        image_size=image_size,
        image_format=image_format,
        start_index=start_index,
        storage_options=storage_options,
    )


def write_parquet_shards(
    out_dir_or_uri: str,
    *,
    seed: int,
    num_shards: int,
    per_shard: int,
    image_size: int = 64,
    image_format: str = "png",
    start_index: int = 0,
    storage_options: dict | None = None,
) -> list[str]:
    """Write `{i:05d}.parquet` shards with the columns of PARQUET_SCHEMA; return their URIs."""
    return _write_shards(
        _write_parquet,
        "parquet",
        out_dir_or_uri,
        seed=seed,
        num_shards=num_shards,
        per_shard=per_shard,
        image_size=image_size,
        image_format=image_format,
        start_index=start_index,
        storage_options=storage_options,
    )
