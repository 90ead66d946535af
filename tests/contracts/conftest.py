"""Contract suites: one module per interface with more than one implementation, each test run against all of
them. The signed artifacts come from the deployment tests' fixtures."""

from tests.agent.deploy.conftest import bundles, key, v1, v2

__all__ = ["bundles", "key", "v1", "v2"]
