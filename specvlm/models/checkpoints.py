"""Where a checkpoint's files are, and which version of them.

A checkpoint is a local directory, a Hugging Face model id already in the local cache, or an fsspec URI (s3://,
gs://, ...). A URI is copied into a node-local cache and loaded from there. The copy is keyed by the URI *and* the
checkpoint's identity, the size and version (ETag, or modification time where a store has no ETag) of every
file, so a checkpoint retrained in place at the same URI is copied again instead of served stale, and the
identity the output's config hash records (`weights_fingerprint`) is the identity of the weights each node loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

# Where fsspec filesystems report a file's version, strongest first: S3's ETag (a digest of the content),
# GCS's md5Hash / generation, then a modification or creation time for stores without a content digest.
VERSION_KEYS = ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified", "updated", "created")
# Files a processor or tokenizer never reads: a processor-only copy (for preprocessing on CPU nodes) skips them.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
COMPLETE = ".complete"  # written last into a copy; its presence means the copy is whole


class ModelLoadError(ValueError):
    pass


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPECVLM_CACHE", Path.home() / ".cache" / "specvlm")) / "models"


def is_uri(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def resolve_model_dir(
    location: str, *, storage_options: dict | None = None, cache_dir: Path | None = None, weights: bool = True
) -> Path:
    """A local directory holding the checkpoint named by `location`. weights=False is enough for a processor
    or tokenizer: a URI is then copied without its weight files, unless the node already holds a full copy."""
    if is_uri(location):
        return _copy_from_uri(location, storage_options or {}, cache_dir or default_cache_dir(), weights)
    path = Path(location.removeprefix("file://")).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"model path {location!r} is a file; point to the checkpoint's directory")
    # Not a path: maybe a Hugging Face model id already in the local cache. Never download at run time.
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(location, local_files_only=True))
    except Exception as exc:
        raise ModelLoadError(
            f"model {location!r} is not a local directory, not a URI (s3://, gs://, ...), and not in the "
            f"Hugging Face cache; download it there first or point to a local copy ({type(exc).__name__})"
        ) from None


def weights_fingerprint(location: str, storage_options: dict | None = None) -> str:
    """A short digest of the checkpoint's identity that changes when any of its files is rewritten, read from a
    listing (no download). The node cache keys its copies by the same identity."""
    fs, root = _filesystem(location, storage_options or {})
    return _identity(checkpoint_files(fs, root, location))


def read_model_config(location: str, storage_options: dict | None = None) -> dict:
    """The checkpoint's config.json, read without copying or loading anything else: confirms the checkpoint exists
    and tells what kind of model it is."""
    if is_uri(location):
        fs, root = _filesystem(location, storage_options or {})
        try:
            with fs.open(root + "/config.json", "rb") as f:
                text = f.read()
        except FileNotFoundError:
            raise ModelLoadError(
                f"{location!r} has no config.json (or is not readable with these credentials)"
            ) from None
    else:
        path = resolve_model_dir(location) / "config.json"
        if not path.exists():
            raise ModelLoadError(f"{location!r} is a directory without config.json: not a Hugging Face checkpoint")
        text = path.read_bytes()
    try:
        config = json.loads(text)
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{location!r}: config.json is not a JSON object; the checkpoint is damaged")
    return config


def checkpoint_files(fs, root: str, location: str) -> dict[str, tuple[int, str]]:
    """Every file of the checkpoint below `root`: relative path -> (size, version). Hidden files and folders
    (`.cache/`, `.gitattributes`, ...) are tool litter, not part of the checkpoint."""
    fs.invalidate_cache(root)  # a listing cached by an earlier call would hide a replaced checkpoint
    try:
        found = fs.find(root, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        found = {}
    files = {}
    for path, info in found.items():
        name = path.removeprefix(root + "/")
        if info.get("type") == "directory" or _hidden(name):
            continue
        # Object keys are names, not paths: one with `..` segments would be copied outside the cache folder.
        if posixpath.normpath(name).startswith(("../", "/")) or posixpath.normpath(name) == "..":
            raise ModelLoadError(
                f"{location!r} holds an object named {name!r}, which would be copied outside the model cache; "
                "rename or remove that object"
            )
        version = next((str(info[key]) for key in VERSION_KEYS if info.get(key) is not None), "")
        files[name] = (int(info.get("size") or 0), version)
    if not files:
        raise ModelLoadError(f"{location!r} holds no files (or is not readable with these credentials)")
    return files


def _hidden(name: str) -> bool:
    return any(part.startswith(".") and part not in (".", "..") for part in name.split("/"))


def _identity(files: dict[str, tuple[int, str]]) -> str:
    listing = json.dumps(sorted((name, size, version) for name, (size, version) in files.items()))
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def _filesystem(location: str, storage_options: dict):
    import fsspec

    if is_uri(location):
        fs, root = fsspec.core.url_to_fs(location, **storage_options)
        return fs, root.rstrip("/")
    # Absolute, as the local filesystem lists its files, so that names come out relative to the checkpoint.
    return fsspec.filesystem("file"), os.path.abspath(resolve_model_dir(location))


def _copy_from_uri(uri: str, storage_options: dict, cache_dir: Path, weights: bool) -> Path:
    fs, root = _filesystem(uri, storage_options)
    files = checkpoint_files(fs, root, uri)
    prefix = hashlib.sha256(uri.encode()).hexdigest()[:16]
    full = cache_dir / f"{prefix}-{_identity(files)}"
    local = full if weights else full.with_name(full.name + "-config")
    if ready := _complete(full, local):
        return ready
    cache_dir.mkdir(parents=True, exist_ok=True)
    # One copy per node: concurrent actors and tasks on a node wait for the first one's copy instead of each
    # downloading the checkpoint (the lock is the OS's, so a copier that dies releases it).
    with FileLock(str(cache_dir / f"{prefix}.lock")):
        if ready := _complete(full, local):
            return ready
        wanted = {name: info for name, info in files.items() if weights or not name.endswith(WEIGHT_SUFFIXES)}
        staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".partial-"))
        try:
            for name in sorted(wanted):
                target = staging / posixpath.normpath(name)
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{root}/{name}", str(target))
            if _identity(checkpoint_files(fs, root, uri)) != _identity(files):
                raise ModelLoadError(
                    f"{uri!r} changed while it was being copied (a checkpoint being replaced?); load it again "
                    "once the upload is complete"
                )
            (staging / COMPLETE).write_text(json.dumps({"uri": uri, "files": files}, indent=1))
            staging.rename(local)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        # Copies of older versions of this checkpoint are never loaded again: free their space.
        for stale in cache_dir.glob(f"{prefix}-*"):
            if not stale.name.startswith(full.name):
                shutil.rmtree(stale, ignore_errors=True)
    return local


def _complete(*copies: Path) -> Path | None:
    """The first of `copies` that is whole (a full copy serves a processor too)."""
    return next((copy for copy in copies if (copy / COMPLETE).exists()), None)
