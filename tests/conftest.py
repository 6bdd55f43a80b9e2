"""Shared pytest fixtures. Fixture modules live beside the tests and are registered here."""

pytest_plugins = ["tests.fixtures_s3", "tests.fixtures_proxy", "tests.fixtures_models", "tests.fixtures_ray"]
