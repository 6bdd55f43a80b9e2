"""Benchmark layouts as inputs: COCO captions, VQAv2, ScienceQA, plain JSONL and Hugging Face datasets.

An annotation layout (coco, vqav2, scienceqa, jsonl) is an annotation file plus the image files it names, under
an image root (`input.images`; by default the annotation file's folder, `images/` beside it for ScienceQA):

    coco       captions_*.json: {"images": [{id, file_name, ...}], "annotations": [{image_id, caption}]}
               -> one sample per image, every caption a reference; image {root}/{file_name}
    vqav2      *_questions.json: {"data_subtype", "questions": [{question_id, image_id, question}]}, answers from
               the annotations file beside it (v2_OpenEnded_mscoco_val2014_questions.json ->
               v2_mscoco_val2014_annotations.json) or input.annotations; none for a test split
               -> one sample per question, the ten human answers its references;
               image {root}/COCO_{data_subtype}_{image_id:012d}.jpg
    scienceqa  problems.json: {pid: {question, choices, answer (index), hint, image (or null), split, subject, ...}}
               -> one multiple-choice sample per problem (input.split keeps one split);
               image {root}/{split}/{pid}/{image}; a problem without an image is a text-only prompt
    jsonl      one {image, question, answer} object per line (also caption, choices, key or id); image paths are
               relative to the root or full URIs; a list answer or caption gives several references

Listing parses the annotations once and cuts their samples, in file order, into shards of files_per_shard; a
shard lists its sample ids, so it always reads the same samples. Reading parses the annotations again (once per
process) and fetches the shard's images. Fields the layout has beyond the task's go to the record's metadata,
where evaluation slices by them.

    hf         a Hugging Face `datasets` dataset saved with save_to_disk (Arrow files; a DatasetDict's split by
               input.split) or as Parquet: read file by file like Parquet shards, the image column found from
               the features the dataset stores; an image stored as a path is read from the image root.
"""

from __future__ import annotations

import functools
import json
import posixpath
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs

from specvlm.data.error_kinds import tagged
from specvlm.data.listing import file_ids, to_uri, visible
from specvlm.data.prompts import LETTERS
from specvlm.data.records import Record, Shard, SourceError, fetch_image, fields_record, task_fields
from specvlm.data.retry import with_retries

ANNOTATION_FORMATS = ("coco", "vqav2", "scienceqa", "jsonl")
BENCHMARK_FORMATS = (*ANNOTATION_FORMATS, "hf")
_IMAGE_SUBFOLDER = {"scienceqa": "images"}  # where the images sit beside the annotations by default
_FETCH_THREADS = 16  # concurrent image GETs: object stores have high latency per file


def list_benchmark_shards(
    uri: str,
    format: str,
    *,
    storage_options: dict,
    files_per_shard: int,
    images: str | None = None,
    annotations: str | None = None,
    split: str | None = None,
) -> list[Shard]:
    fs, path = url_to_fs(uri, **storage_options)
    fs.invalidate_cache()
    if format == "hf":
        return _hf_shards(fs, path, split, images)
    if format == "jsonl":
        root, paths = visible(fs, path)
        paths = [p for p in paths if p.lower().endswith(".jsonl")]
    elif fs.isfile(path):
        root, paths = posixpath.dirname(path), [path]
    else:
        raise SourceError(f"{uri} is not a file; a {format} benchmark is read from its annotation file")
    if not paths:
        raise SourceError(f"{uri} matches no .jsonl files; check the path and the glob")
    shards = []
    for p, prefix in zip(paths, file_ids(paths, root)):
        file_uri = to_uri(fs, p)
        answers = _answers_file(fs, file_uri, annotations) if format == "vqav2" else ""
        image_root = images or _default_image_root(file_uri, format)
        keys = list(_samples(format, file_uri, answers, split, storage_options))
        if not keys:
            raise SourceError(f"{file_uri} holds no samples" + (f" of split {split!r}" if split else ""))
        shards += [
            Shard(
                uri=file_uri,
                format=format,
                shard_id=f"{prefix}-{n:05d}",
                files=tuple(keys[start : start + files_per_shard]),
                images=image_root,
                annotations=answers,
                split=split or "",
            )
            for n, start in enumerate(range(0, len(keys), files_per_shard))
        ]
    return shards


def read_benchmark_shard(shard: Shard, storage_options: dict) -> Iterator[Record]:
    """An annotation layout's shard (a Hugging Face dataset's files are tables: tables.read_table)."""
    samples = _samples(shard.format, shard.uri, shard.annotations, shard.split or None, storage_options)
    missing = [key for key in shard.files if key not in samples]
    if missing:
        raise SourceError(
            f"{len(missing)} samples of this shard (e.g. {missing[0]!r}) are no longer in {shard.uri}; the annotations"
            " changed since the job listed them: write to a new output"
        )

    def fetch(location: str | None) -> bytes | str | None:
        return None if location is None else fetch_image(location, shard.images, storage_options, "check input.images")

    keys = list(shard.files)
    # map() keeps the order; a bounded batch at a time caps how many images sit in memory.
    with ThreadPoolExecutor(_FETCH_THREADS) as pool:
        for start in range(0, len(keys), _FETCH_THREADS):
            batch = keys[start : start + _FETCH_THREADS]
            for key, image in zip(batch, pool.map(fetch, [samples[k]["image"] for k in batch])):
                yield fields_record(shard, key, samples[key], image)


# ---------------------------------------------------------------- annotation layouts


def _default_image_root(file_uri: str, format: str) -> str:
    folder = posixpath.dirname(file_uri)
    sub = _IMAGE_SUBFOLDER.get(format)
    return posixpath.join(folder, sub) if sub else folder


def _answers_file(fs: AbstractFileSystem, questions_uri: str, annotations: str | None) -> str:
    """VQAv2's answers: the given file, else the one its questions file's name implies, if present."""
    if annotations:
        return annotations
    folder, name = posixpath.split(questions_uri)
    implied = name.replace("OpenEnded_", "").replace("MultipleChoice_", "").replace("_questions", "_annotations")
    if implied == name:
        return ""
    candidate = posixpath.join(folder, implied)
    return candidate if fs.exists(candidate) else ""


def _samples(format: str, uri: str, answers: str, split: str | None, storage_options: dict) -> dict[str, dict]:
    """key -> sample: the task fields, `image` (a path under the image root, a URI, or None) and `meta`.
    Parsed once per process for each version of the files (their fsspec ukey)."""
    options = json.dumps(storage_options, sort_keys=True)
    versions = tuple(_version(u, storage_options) for u in (uri, answers) if u)
    return _parse(format, uri, answers, split, options, versions)


def _version(uri: str, storage_options: dict) -> str:
    fs, path = url_to_fs(uri, **storage_options)
    return fs.ukey(path)


@functools.lru_cache(maxsize=4)
def _parse(format: str, uri: str, answers: str, split: str | None, options: str, versions: tuple) -> dict[str, dict]:
    storage_options = json.loads(options)
    if format == "jsonl":
        return _jsonl(_read_text(uri, storage_options), uri)
    document = _read_json(uri, storage_options)
    try:
        if format == "coco":
            return _coco(document)
        if format == "vqav2":
            return _vqav2(document, _read_json(answers, storage_options) if answers else None)
        return _scienceqa(document, split)
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise SourceError(f"{uri} is not in the {format} layout ({type(e).__name__}: {e}); check input.format") from e


def _read_text(uri: str, storage_options: dict) -> str:
    fs, path = url_to_fs(uri, **storage_options)
    return with_retries(partial(fs.cat_file, path)).decode("utf-8")


def _read_json(uri: str, storage_options: dict):
    try:
        return json.loads(_read_text(uri, storage_options))
    except ValueError as e:
        raise SourceError(f"{uri} is not valid JSON ({e})") from e


def _coco(document: dict) -> dict[str, dict]:
    captions = defaultdict(list)
    for annotation in sorted(document["annotations"], key=lambda a: a.get("id", 0)):
        captions[annotation["image_id"]].append(annotation["caption"].strip())
    samples = {}
    for image in document["images"]:
        references = captions.get(image["id"], [])
        samples[str(image["id"])] = {
            "image": image["file_name"],
            "caption": references[0] if references else None,
            "references": references or None,
            "meta": {("image_id" if k == "id" else k): v for k, v in image.items() if k != "file_name"},
        }
    return samples


def _vqav2(questions: dict, annotations: dict | None) -> dict[str, dict]:
    by_question = {a["question_id"]: a for a in (annotations or {}).get("annotations", [])}
    subtype = questions["data_subtype"]
    samples = {}
    for q in questions["questions"]:
        answered = by_question.get(q["question_id"], {})
        samples[str(q["question_id"])] = {
            "image": f"COCO_{subtype}_{q['image_id']:012d}.jpg",
            "question": q["question"],
            "answer": answered.get("multiple_choice_answer"),
            "references": [a["answer"] for a in answered["answers"]] if answered else None,
            "meta": {
                "image_id": q["image_id"],
                **{k: answered[k] for k in ("question_type", "answer_type") if k in answered},
            },
        }
    return samples


_SCIENCEQA_META = ("subject", "topic", "category", "grade", "skill", "task", "split")


def _scienceqa(problems: dict, split: str | None) -> dict[str, dict]:
    samples = {}
    for pid, p in problems.items():
        if split and p.get("split") != split:
            continue
        hint = (p.get("hint") or "").strip()
        samples[str(pid)] = {
            "image": f"{p['split']}/{pid}/{p['image']}" if p.get("image") else None,
            # The context goes before the question, as ScienceQA's own prompts put it.
            "question": f"Context: {hint}\n{p['question']}" if hint else p["question"],
            "choices": [str(c) for c in p["choices"]],
            "answer": LETTERS[p["answer"]],
            "meta": {**{k: p[k] for k in _SCIENCEQA_META if k in p}, "has_image": bool(p.get("image"))},
        }
    return samples


def _jsonl(text: str, uri: str) -> dict[str, dict]:
    samples = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            problem = tagged("record_invalid", f"line {number} of {uri} is not a JSON object ({e})")
            samples[f"line{number}"] = {"image": None, "error": problem}
            continue
        key = row.pop("key") if "key" in row else row.pop("id", None)
        samples[str(number - 1 if key is None else key)] = {"image": row.pop("image", None), **task_fields(row)}
    return samples


# ---------------------------------------------------------------- Hugging Face datasets


def _hf_shards(fs: AbstractFileSystem, path: str, split: str | None, images: str | None) -> list[Shard]:
    folder = path
    if fs.isfile(path):
        folder, files = posixpath.dirname(path), [path]
    else:
        if fs.exists(posixpath.join(path, "dataset_dict.json")):  # a DatasetDict: one folder per split
            splits = json.loads(fs.cat_file(posixpath.join(path, "dataset_dict.json")))["splits"]
            if split is None and len(splits) == 1:
                split = splits[0]
            if split not in splits:
                raise SourceError(f"{path} holds the splits {splits}; set input.split to one of them")
            folder = path = posixpath.join(path, split)
        if fs.exists(posixpath.join(path, "state.json")):  # save_to_disk names its data files here
            state = json.loads(fs.cat_file(posixpath.join(path, "state.json")))
            files = [posixpath.join(path, f["filename"]) for f in state["_data_files"]]
        else:
            files = [p for p in visible(fs, path)[1] if p.endswith((".arrow", ".parquet"))]
            if split:  # the Hub's Parquet layout: data/{split}-00000-of-00001.parquet
                files = [p for p in files if posixpath.basename(p).startswith(f"{split}-")]
    if not files:
        raise SourceError(f"{path} has no .arrow or .parquet files" + (f" of split {split!r}" if split else ""))
    root = images or to_uri(fs, folder)
    return [
        Shard(uri=to_uri(fs, p), format="hf", shard_id=i, images=root) for p, i in zip(files, file_ids(files, folder))
    ]
