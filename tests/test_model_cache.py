"""The node-local model cache: a checkpoint from object storage is copied once per node, copied again when it is
replaced at the same URI, and never written outside the cache folder."""

import hashlib
import threading
import time

import fsspec
import pytest
import s3fs
import torch
from fsspec.implementations.memory import MemoryFileSystem
from transformers import AutoModelForImageTextToText

from pipeline.job import run_job
from specvlm.demo.shards import write_webdataset_shards
from specvlm.models.checkpoints import COMPLETE, ModelLoadError, resolve_model_dir, weights_fingerprint
from specvlm.models.loading import load_target
from tests.fixtures_s3 import upload_models
from tests.test_pipeline import MAX_NEW, SEED, config_for, read_output

URI = "memory://ckpt/target"


@pytest.fixture
def memory_checkpoint(models):
    fs = fsspec.filesystem("memory")
    fs.put(str(models / "target"), "/ckpt/target", recursive=True)
    yield fs
    fs.rm("/ckpt", recursive=True)


@pytest.fixture
def fetches(monkeypatch):
    """Every file fetched from the memory filesystem, in order."""
    fetched = []
    original = MemoryFileSystem.get_file

    def counting(self, rpath, lpath, **kwargs):
        fetched.append(rpath)
        time.sleep(0.01)  # long enough for concurrent loaders to overlap
        return original(self, rpath, lpath, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "get_file", counting)
    return fetched


def copies(cache):
    return sorted(p.name for p in cache.iterdir() if p.is_dir())


def test_uri_checkpoint_is_copied_once_and_then_loaded_from_the_node(memory_checkpoint, fetches, tmp_path):
    first = resolve_model_dir(URI, cache_dir=tmp_path)
    assert (first / COMPLETE).exists() and (first / "model.safetensors").exists()
    files = len(fetches)
    assert files == len(memory_checkpoint.find("/ckpt/target"))
    assert resolve_model_dir(URI, cache_dir=tmp_path) == first
    assert len(fetches) == files, "an unchanged checkpoint must come from the node's copy"
    assert weights_fingerprint(URI) in first.name  # the copy is keyed by the identity the output hash records


def test_a_local_checkpoint_has_one_fingerprint_however_it_is_named(models, monkeypatch):
    monkeypatch.chdir(models.parent)
    assert weights_fingerprint(f"{models.name}/target") == weights_fingerprint(str(models / "target"))


def test_checkpoint_replaced_at_the_same_uri_is_copied_again(memory_checkpoint, models, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECVLM_CACHE", str(tmp_path))  # load_target copies into the default cache
    old = resolve_model_dir(URI)
    before = weights_fingerprint(URI)
    retrained = AutoModelForImageTextToText.from_pretrained(models / "target")
    with torch.no_grad():
        retrained.lm_head.weight.mul_(1.5)
    retrained.save_pretrained(tmp_path / "retrained")
    memory_checkpoint.put(str(tmp_path / "retrained" / "model.safetensors"), "/ckpt/target/model.safetensors")

    new = resolve_model_dir(URI)
    assert new != old and weights_fingerprint(URI) != before
    assert copies(tmp_path / "models") == [new.name], "the stale copy is removed once the new one is complete"
    loaded = load_target(URI, device="cpu", dtype="float32", storage_options={})
    assert torch.equal(loaded.model.lm_head.weight, retrained.lm_head.weight)


def test_concurrent_loaders_on_a_node_share_one_copy(memory_checkpoint, fetches, tmp_path):
    results = []

    def load():
        results.append(resolve_model_dir(URI, cache_dir=tmp_path))

    loaders = [threading.Thread(target=load) for _ in range(4)]
    for loader in loaders:
        loader.start()
    for loader in loaders:
        loader.join()
    assert len(set(results)) == 1 and len(results) == 4
    assert sorted(fetches) == sorted(set(fetches)), "each file is downloaded once per node, not once per loader"
    assert copies(tmp_path) == [results[0].name]


def test_processor_copy_skips_the_weights(memory_checkpoint, fetches, tmp_path):
    config_only = resolve_model_dir(URI, cache_dir=tmp_path, weights=False)
    assert (config_only / "config.json").exists() and not list(config_only.glob("*.safetensors"))
    assert not [f for f in fetches if f.endswith(".safetensors")]
    full = resolve_model_dir(URI, cache_dir=tmp_path)
    assert resolve_model_dir(URI, cache_dir=tmp_path, weights=False) == full, "a full copy serves the processor too"


def test_object_keys_cannot_escape_the_cache_folder(s3_bucket, models, tmp_path):
    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    fs.put(str(models / "target") + "/", f"{bucket}/ckpt/", recursive=True)
    fs.pipe(f"{bucket}/ckpt/sub/../../../escaped.txt", b"outside")  # S3 keys are names: `..` is kept as is
    cache = tmp_path / "deep" / "cache"
    uri = f"s3://{bucket}/ckpt"
    with pytest.raises(ModelLoadError, match=r"outside the model cache.*rename or remove"):
        resolve_model_dir(uri, storage_options={"endpoint_url": options["endpoint_url"]}, cache_dir=cache)
    with pytest.raises(ModelLoadError, match="outside the model cache"):
        weights_fingerprint(uri, {"endpoint_url": options["endpoint_url"]})  # so a job's preflight refuses it
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == [], f"nothing may be written: {written}"


def _greedy(model, processor, image, prompt):
    encoded = processor(images=image, text=prompt, return_tensors="pt")
    out = model.generate(**encoded, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0)
    return out[0, encoded.input_ids.shape[1] :].tolist()


@pytest.mark.slow
def test_second_job_decodes_with_a_checkpoint_replaced_at_the_same_uri(
    family, models, s3_bucket, s3_endpoint, ray_local, worker_model_cache, tmp_path
):
    bucket, options = s3_bucket
    upload_models(models, bucket, options)
    fs = s3fs.S3FileSystem(**options)
    write_webdataset_shards(str(tmp_path / "in"), seed=SEED, num_shards=1, per_shard=3)
    remote = [
        f"model.target=s3://{bucket}/models/target",
        f"draft.path=s3://{bucket}/models/draft",
        f"model.storage_options.endpoint_url={s3_endpoint}",
    ]

    uris = [f"s3://{bucket}/models/{name}" for name in ("target", "draft")]
    prefixes = tuple(hashlib.sha256(uri.encode()).hexdigest()[:16] for uri in uris)

    def run(output):
        run_job(config_for(models, f"{tmp_path}/in", f"{tmp_path}/{output}", *remote), log=lambda *_: None)
        rows = read_output(f"{tmp_path}/{output}")["00000.parquet"].to_pylist()
        full_copies = [p for p in worker_model_cache.iterdir() if p.name.startswith(prefixes) and p.is_dir()]
        return rows, [p for p in full_copies if not p.name.endswith("-config")]

    first, cached = run("first")
    assert len(cached) == 2, "one copy each of the target and the draft on this node"

    retrained = AutoModelForImageTextToText.from_pretrained(models / "target")
    with torch.no_grad():
        for name, p in retrained.named_parameters():
            if "language_model" in name or "lm_head" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * p.std() * 0.5)
    retrained.save_pretrained(tmp_path / "retrained")
    fs.put(str(tmp_path / "retrained" / "model.safetensors"), f"{bucket}/models/target/model.safetensors")

    second, cached_after = run("second")
    target_copies = {p.name for p in cached_after} - {p.name for p in cached}
    assert len(cached_after) == 2 and len(target_copies) == 1, "the target copied again, the old copy dropped"
    assert weights_fingerprint(uris[0], {"endpoint_url": s3_endpoint}) in target_copies.pop()

    from specvlm.data.images import decode_image
    from specvlm.data.sources import list_shards, read_shard

    [shard] = list_shards(f"{tmp_path}/in")
    images = {r["key"]: decode_image(r["image"]) for r in read_shard(shard)}
    old = [_greedy(family.target, family.processor, images[r["key"]], r["prompt"]) for r in first]
    new = [_greedy(retrained, family.processor, images[r["key"]], r["prompt"]) for r in second]
    assert old != new, "the retrained target must decode differently, or this test proves nothing"
    assert [r["output_ids"] for r in first] == old
    assert [r["output_ids"] for r in second] == new, "the second job decoded with the stale copy"
    assert first[0]["config_hash"] != second[0]["config_hash"]
