"""One local Ray instance for all pipeline tests (starting Ray costs seconds)."""

import pytest


@pytest.fixture(scope="session")
def worker_model_cache(tmp_path_factory):
    """The node-local model cache of the session's Ray workers (their SPECVLM_CACHE, plus `models/`)."""
    return tmp_path_factory.mktemp("specvlm-cache") / "models"


@pytest.fixture(scope="session")
def ray_local(s3_endpoint, worker_model_cache):
    # Ray's worker processes inherit the environment at start-up: the S3 test endpoint's credentials must be
    # in it first, which the s3_endpoint dependency guarantees, and so must the model cache, so that no test
    # copies checkpoints into the home directory.
    import ray

    with pytest.MonkeyPatch.context() as env:
        env.setenv("SPECVLM_CACHE", str(worker_model_cache.parent))
        # address="local": always a fresh local Ray for the tests, never one that happens to run on this machine.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
