"""The caption job on a Ray cluster of three nodes: a head, a CPU worker, and a worker advertising a GPU (a CPU
underneath), the models in object storage (moto).

- The decode actors land where the config asks (compute.num_gpus: the GPU node), preprocessing runs as CPU tasks
  elsewhere: weights are copied only to the node that decodes, once however many actors it holds.
- Every row is written once.
- Then the CPU worker is removed mid-run, and the job still completes with every row exactly once.

The cluster (ray.cluster_utils.Cluster) runs in its own process, `scenario`, apart from the session's local Ray
of tests/fixtures_ray.py; each node has its own model cache (SPECVLM_CACHE) so copies can be told apart.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from specvlm.demo.shards import write_webdataset_shards
from tests.fixtures_s3 import upload_models
from tests.test_pipeline import PER_SHARD, SEED, read_output

NODES = ("head", "cpu", "gpu")
SHARDS = {"placement": 3, "node_loss": 6}


def scenario(settings: str) -> None:
    """In a process of its own: start the cluster, run both jobs, write what happened to settings["report"]."""
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.config import load_config
    from pipeline.job import run_job

    s = json.loads(settings)
    root = Path(s["root"])
    cache = {name: root / "cache" / name for name in NODES}
    quiet = {"include_dashboard": False, "object_store_memory": 100 * 2**20}
    # As on KubeRay (infra/kuberay): the head runs no tasks or actors. The GPU node has a CPU beyond its decode
    # actors' for tasks: the only one left once the CPU worker is gone.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "env_vars": {"SPECVLM_CACHE": str(cache["head"])}, **quiet},
    )
    cpu_worker = cluster.add_node(num_cpus=1, env_vars={"SPECVLM_CACHE": str(cache["cpu"])}, **quiet)
    cluster.add_node(num_cpus=2, num_gpus=1, env_vars={"SPECVLM_CACHE": str(cache["gpu"])}, **quiet)
    ray.init(address=cluster.address, log_to_driver=False)

    def config(run: str):
        return load_config(
            None,
            [
                f"input.uri={root}/{run}",
                f"output.uri={root}/out-{run}",
                f"model.target={s['target']}",
                "draft.kind=vlm",
                f"draft.path={s['draft']}",
                f"model.storage_options.endpoint_url={s['endpoint']}",
                "model.device=cpu",  # the "GPU" is a CPU underneath
                "draft.gamma=3",
                "decode.max_new_tokens=8",
                "compute.batch_size=2",
                # Two actors of half a GPU each: both must land on the GPU node and share its copy.
                "compute.actors=2",
                "compute.num_gpus=0.5",
                "compute.cpus_per_actor=0.5",
                "output.max_error_fraction=0",
            ],
        )

    report = {}
    run_job(config("placement"), log=lambda *_: None)
    report["caches_after_placement"] = {name: _copies(folder) for name, folder in cache.items()}

    # The second job loses the CPU worker while that node runs one of the job's tasks (its CPU taken), so the
    # task and the blocks it made must be redone elsewhere.
    finished = threading.Event()
    errors = []

    def run():
        try:
            run_job(config("node_loss"), log=lambda *_: None)
        except Exception as exc:
            errors.append(repr(exc))
        finally:
            finished.set()

    job = threading.Thread(target=run, daemon=True)
    job.start()
    output = root / "out-node_loss"
    while not finished.is_set() and not _busy(cpu_worker.node_id):
        time.sleep(0.01)
    cluster.remove_node(cpu_worker, allow_graceful=False)
    report["shards_written_at_removal"] = len(list(output.glob("*.parquet")))
    report["removed_mid_run"] = not finished.is_set()
    job.join(timeout=s["timeout"])
    report["finished"] = finished.is_set()
    report["errors"] = errors
    Path(s["report"]).write_text(json.dumps(report))
    ray.shutdown()
    cluster.shutdown()


def _busy(node_id: str) -> bool:
    """Whether a task or actor holds the node's CPU. (Ray's per-node view has no public API without a dashboard.)"""
    from ray._private.state import available_resources_per_node

    available = available_resources_per_node().get(node_id)
    return available is not None and available.get("CPU", 0.0) < 1.0  # a resource all in use is left out


def _copies(folder: Path) -> dict[str, list[str]]:
    """Copies in a node's cache: folder name -> the files it holds."""
    models = folder / "models"
    if not models.exists():
        return {}
    return {c.name: sorted(p.name for p in c.iterdir()) for c in models.iterdir() if c.is_dir()}


def _weight_downloads(log: Path, key: str) -> int:
    return len(re.findall(rf'"GET /{re.escape(key)} HTTP', log.read_text()))


@pytest.mark.slow
def test_job_on_three_nodes_places_actors_copies_weights_once_and_survives_losing_a_node(
    models, s3_bucket, s3_endpoint, s3_request_log, tmp_path
):
    bucket, options = s3_bucket
    upload_models(models, bucket, options)
    for run, shards in SHARDS.items():
        write_webdataset_shards(str(tmp_path / run), seed=SEED, num_shards=shards, per_shard=PER_SHARD)
    settings = {
        "root": str(tmp_path),
        "target": f"s3://{bucket}/models/target",
        "draft": f"s3://{bucket}/models/draft",
        "endpoint": s3_endpoint,
        "report": str(tmp_path / "report.json"),
        "timeout": 400,
    }
    # A fresh environment for the cluster: no RAY_ADDRESS, the moto credentials (set by s3_endpoint) inherited.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    code = f"from tests.test_multinode import scenario; scenario({json.dumps(json.dumps(settings))})"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever of the cluster outlived its driver
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0 and (tmp_path / "report.json").exists(), output[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())

    # Placement: weights only on the GPU node, where both decode actors run; preprocessing as CPU tasks, which
    # copy the processor's files alone; nothing on the head.
    caches = report["caches_after_placement"]
    full = {node: [c for c, files in copies.items() if "model.safetensors" in files] for node, copies in caches.items()}
    assert len(full["gpu"]) == 2, f"the GPU node holds one copy each of target and draft: {caches['gpu']}"
    assert full["cpu"] == [] and caches["cpu"], f"the CPU worker preprocesses without weights: {caches['cpu']}"
    assert caches["head"] == {}, f"the head runs no tasks: {caches['head']}"
    # Once per node: two actors, one download of each checkpoint's weights (both jobs together).
    for name in ("target", "draft"):
        assert _weight_downloads(s3_request_log, f"{bucket}/models/{name}/model.safetensors") == 1, name

    # Every row once, with and without the lost node.
    assert report["removed_mid_run"], "the job ended before the node was removed: the test proves nothing"
    assert report["shards_written_at_removal"] < SHARDS["node_loss"]
    assert report["finished"] and report["errors"] == [], report
    for run, shards in SHARDS.items():
        rows = [r for t in read_output(f"{tmp_path}/out-{run}").values() for r in t.to_pylist()]
        keys = [(r["shard_id"], r["key"]) for r in rows]
        assert len(keys) == len(set(keys)) == shards * PER_SHARD, run
        assert all(r["error"] is None for r in rows), run
