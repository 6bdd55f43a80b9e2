"""One local Ray instance for all pipeline tests (starting Ray costs seconds)."""

import pytest


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    # Ray's worker processes inherit the environment at start-up: the S3 test endpoint's credentials must be
    # in it first, which the s3_endpoint dependency guarantees.
    import ray

    # address="local": always a fresh local Ray for the tests, never one that happens to run on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
