"""Deltas on the device: a device that holds most of a new artifact (copied from its installed model) and lacks
a few scattered chunks asks for them alone instead of following the broadcast; one that lacks a tail, or has
no base, follows the broadcast (which starts at the first chunk the slowest device lacks)."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.deploy.bitmap import ChunkBitmap
from agent.deploy.config import DeployConfig
from agent.deploy.delta import goes_sparse, missing_bytes, sparse_is_better
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


def test_sparse_only_for_few_scattered_missing_chunks_copied_from_the_installed_model(
    key: Ed25519PrivateKey,
) -> None:
    sizes = [1024] * 40
    tail = [i < 36 for i in range(40)]  # the last 4 missing: the broadcast from chunk 36 on is just those
    scattered = [i not in (2, 20, 39) for i in range(40)]
    assert not sparse_is_better(sizes, tail, 0.25), "a missing tail comes by the broadcast, one copy for all"
    assert sparse_is_better(sizes, scattered, 0.25), "3 chunks asked for rather than 38 received"
    assert not sparse_is_better(sizes, scattered, 0.05), "over the sparse share: follow the broadcast"
    assert not sparse_is_better(sizes, [True] * 40, 1.0), "nothing missing"
    _, v2 = versions(key, 40, {2, 20, 39})
    held = ChunkBitmap(len(v2))
    for index in range(len(v2)):
        if index not in (2, 20, 39):
            held.add(index)
    assert missing_bytes(v2.manifest, held) == 3 * 1024
    assert goes_sparse(v2.manifest, held, copied=37, fraction=0.25)
    assert not goes_sparse(v2.manifest, held, copied=0, fraction=0.25), "resumed, not copied: the broadcast"


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


def test_a_device_lacking_the_tail_follows_the_broadcast_and_one_without_the_base_too(
    key: Ed25519PrivateKey,
) -> None:
    v1, v2 = versions(key, 40, {38, 39})  # a fine-tuned head: stored last
    d = running(key, v1)
    d.command(deploy(v2, "dep-2"))
    assert topics.artifact_chunks(v2.id) in d.subscriptions
    event = d.events("dep-2")[-1]
    assert not event.sparse and event.listening and event.contiguous == 38 and event.chunks_have == 39
    deliver(d, v2)
    assert d.state == S.ACTIVE and d.active_artifact() == v2.id

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
