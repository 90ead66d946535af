"""Deltas on the device: a device that holds most of a new artifact (copied from its installed model) asks for
the chunks it lacks alone instead of following the broadcast; one without the base follows the broadcast."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.deploy.bitmap import ChunkBitmap
from agent.deploy.config import DeployConfig
from agent.deploy.delta import goes_sparse, missing_bytes
from tests.agent.deploy.harness import Artifact, Device, artifact, deliver, deploy, memory_device
from wire import topics
from wire.messages import DeployState

S = DeployState


def versions(key: Ed25519PrivateKey, n_chunks: int, changed: set[int]) -> tuple[Artifact, Artifact]:
    """Two versions of a ``n_chunks``-chunk model (1 KiB chunks) that differ in the chunks ``changed``."""
    blocks = [hashlib.sha256(b"%d" % i).digest() * 32 for i in range(n_chunks)]
    new = [hashlib.sha256(b"new %d" % i).digest() * 32 if i in changed else b for i, b in enumerate(blocks)]
    v1 = artifact({"model.onnx": b"".join(blocks), "tokenizer.json": b"{}"}, key, version=1)
    v2 = artifact({"model.onnx": b"".join(new), "tokenizer.json": b"{}"}, key, version=2)
    return v1, v2


def running(key: Ed25519PrivateKey, art: Artifact, **kw: object) -> Device:
    d = memory_device(key, **kw)
    d.start()
    d.command(deploy(art, "dep-1"))
    deliver(d, art)
    assert d.state == S.ACTIVE
    return d


def test_goes_sparse_only_when_the_installed_model_supplied_most_of_the_bytes(key: Ed25519PrivateKey) -> None:
    _, v2 = versions(key, 40, {39})
    manifest = v2.manifest
    held = ChunkBitmap(len(v2))
    for index in range(30):
        held.add(index)
    assert missing_bytes(manifest, held) == sum(ref.size for ref in manifest.chunks[30:])
    assert not goes_sparse(manifest, held, copied=0, fraction=0.5), "resumed, not copied: follow the broadcast"
    assert goes_sparse(manifest, held, copied=30, fraction=0.5)
    assert not goes_sparse(manifest, held, copied=30, fraction=0.1), "a quarter missing is over 10%"
    assert not goes_sparse(manifest, ChunkBitmap.full(len(v2)), copied=len(v2), fraction=1.0), "nothing left"


def test_a_device_holding_the_base_asks_for_the_changed_chunks_alone(key: Ed25519PrivateKey) -> None:
    changed = {3, 38}
    v1, v2 = versions(key, 40, changed)
    d = running(key, v1)
    asked_before = len(d.requests())
    d.command(deploy(v2, "dep-2"))
    assert d.state == S.DOWNLOADING
    assert topics.artifact_chunks(v2.id) not in d.subscriptions, "sparse: not following the broadcast"
    first = d.events("dep-2")[-1]
    assert first.sparse and not first.listening and first.chunks_have == len(v2) - len(changed)
    requests = d.requests()[asked_before:]
    assert [r.ranges for r in requests] == [[(3, 4), (38, 39)]], "asked at once, exactly the changed chunks"
    for index in sorted(changed):
        d.chunk(v2.frame(index), repair=True)
    d.tick(0.0)
    assert d.state == S.ACTIVE and d.active_artifact() == v2.id
    counters = d.manager.counters
    assert counters["chunks_received"] == len(v1) + len(changed) and counters["sparse_downloads"] == 1
    assert counters["copied"] == len(v2) - len(changed)


def test_a_device_without_the_base_follows_the_broadcast(key: Ed25519PrivateKey) -> None:
    _, v2 = versions(key, 40, {3})
    d = memory_device(key)
    d.start()
    d.command(deploy(v2, "dep-2"))
    assert topics.artifact_chunks(v2.id) in d.subscriptions
    event = d.events("dep-2")[-1]
    assert not event.sparse and event.listening and d.requests() == []


@pytest.mark.parametrize("fraction", [0.0, 0.01])
def test_a_bigger_change_than_the_sparse_share_follows_the_broadcast(key: Ed25519PrivateKey, fraction: float) -> None:
    v1, v2 = versions(key, 40, set(range(0, 40, 4)))  # a quarter of the chunks changed
    d = running(key, v1, config=DeployConfig(sparse_fraction=fraction))
    d.command(deploy(v2, "dep-2"))
    assert topics.artifact_chunks(v2.id) in d.subscriptions and not d.events("dep-2")[-1].sparse
    deliver(d, v2)
    assert d.state == S.ACTIVE and d.active_artifact() == v2.id
