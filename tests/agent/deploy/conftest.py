"""Fixtures for the deployment tests: a signing key, the tiny classifier's files in two versions."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.agent.deploy.harness import Artifact, artifact, classifier_bundle


@pytest.fixture(scope="session")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("bundles")
    return {"v1": classifier_bundle(root), "v2": classifier_bundle(root, shift=0.5)}


@pytest.fixture(scope="session")
def v1(key: Ed25519PrivateKey, bundles: dict[str, dict[str, bytes]]) -> Artifact:
    return artifact(bundles["v1"], key, version=1)


@pytest.fixture(scope="session")
def v2(key: Ed25519PrivateKey, bundles: dict[str, dict[str, bytes]]) -> Artifact:
    return artifact(bundles["v2"], key, version=2)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "device"
