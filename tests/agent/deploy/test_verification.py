"""What the device refuses: tampered, foreign-signed, expired, older manifests; bad grants; no room."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.deploy.config import DeployConfig
from agent.deploy.disk import DiskSlotStorage
from agent.deploy.memory import MemorySlotStorage
from agent.deploy.record import DiskRecordStore
from tests.agent.deploy.harness import (
    Artifact,
    Device,
    artifact,
    commit,
    deliver,
    deploy,
    memory_device,
    rollback,
)
from wire import signing
from wire.manifest import SignedManifest
from wire.messages import DeployState

S = DeployState


def on_v1(key: Ed25519PrivateKey, v1: Artifact, **kw: Any) -> Device:
    d = memory_device(key, **kw)
    d.start()
    d.command(deploy(v1, "dep-0"))
    deliver(d, v1)
    assert d.state == S.ACTIVE
    return d


def refused(d: Device, deployment_id: str) -> str:
    """The single FAILED event a refused Deploy gets; the active model and the current record are untouched."""
    events = d.events(deployment_id)
    assert [e.state for e in events] == [S.FAILED], events
    assert events[0].installed is not None and events[0].installed.active
    return events[0].reason


def test_a_tampered_manifest_is_refused(key: Ed25519PrivateKey, v1: Artifact, v2: Artifact) -> None:
    d = on_v1(key, v1)
    forged = v2.signed.manifest.model_copy(update={"description": "one more file, trust me"})
    d.command(deploy(Artifact(v2.signed.model_copy(update={"manifest": forged}), v2.files), "dep-x"))
    assert refused(d, "dep-x").startswith("bad_signature:")
    assert d.active_artifact() == v1.id and d.manager.record is not None and d.manager.record.deployment_id == "dep-0"


def test_a_manifest_signed_by_another_key_is_refused(key: Ed25519PrivateKey, bundles: dict, v1: Artifact) -> None:
    other = artifact(bundles["v2"], Ed25519PrivateKey.generate(), version=2)
    d = on_v1(key, v1)
    d.command(deploy(other, "dep-x"))
    reason = refused(d, "dep-x")
    assert reason.startswith("wrong_key:") and "this device trusts key" in reason


def test_an_expired_manifest_is_refused(key: Ed25519PrivateKey, bundles: dict, v1: Artifact) -> None:
    d = on_v1(key, v1)  # the device's clock reads 1000
    d.command(deploy(artifact(bundles["v2"], key, version=2, expires_at=999.0), "dep-x"))
    assert refused(d, "dep-x").startswith("expired:")
    d.command(deploy(artifact(bundles["v2"], key, version=2, expires_at=5000.0), "dep-y"))
    assert d.state == S.DOWNLOADING


def test_without_a_pinned_key_nothing_is_installed(key: Ed25519PrivateKey, v1: Artifact) -> None:
    d = memory_device(key)
    d.manager.key = None
    d.start()
    d.command(deploy(v1))
    assert refused_without_active(d).startswith("no_key:")


def refused_without_active(d: Device) -> str:
    (event,) = d.events()
    assert event.state == S.FAILED and event.installed is None and d.storage.active_slot() is None
    return event.reason


def test_an_older_version_needs_a_signed_rollback_grant(key: Ed25519PrivateKey, v1: Artifact, v2: Artifact) -> None:
    d = on_v1(key, v1)
    d.command(deploy(v2, "dep-2"))
    deliver(d, v2)
    d.command(commit("dep-2"))  # confirmed: the slot holding v1 is freed
    assert [m.version for m in d.manager.installed()] == [2]
    d.command(deploy(v1, "dep-3"))
    assert refused(d, "dep-3").startswith("older_version:")

    d.command(rollback(key, "dep-2", v1))  # signed grant naming this device and v1: fetched and installed
    assert d.state == S.DOWNLOADING
    deliver(d, v1)
    assert d.record_states()[-7:] == [
        S.ACTIVE,
        S.ROLLING_BACK,
        S.DOWNLOADING,
        S.VERIFYING,
        S.STAGED,
        S.ACTIVATING,
        S.ROLLED_BACK,
    ]
    assert d.active_artifact() == v1.id
    assert d.events("dep-2")[-1].installed.version == 1  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ({"device_id": "dev-2"}, "wrong_device"),
        ({"expires_at": 999.0}, "expired"),
        ({"grant_deployment": "dep-other"}, "wrong_deployment"),
        ({"signed_by": "other"}, "bad_signature"),
        ({"with_manifest": False}, "not on this device"),
    ],
)
def test_a_rollback_grant_must_name_this_device_this_deployment_and_be_valid(
    key: Ed25519PrivateKey, v1: Artifact, v2: Artifact, tamper: dict, reason: str
) -> None:
    d = on_v1(key, v1)
    d.command(deploy(v2, "dep-2"))
    deliver(d, v2)
    d.command(commit("dep-2"))
    signer = Ed25519PrivateKey.generate() if tamper.pop("signed_by", None) else key
    d.command(rollback(signer, "dep-2", v1, **tamper))
    (ack,) = d.acks()
    assert not ack.ok and ack.command_id == "dep-2-rollback" and reason in ack.detail
    assert d.state == S.ACTIVE and d.active_artifact() == v2.id


def test_a_grant_for_an_artifact_kept_in_the_other_slot_switches_back_without_a_download(
    key: Ed25519PrivateKey, v1: Artifact, v2: Artifact
) -> None:
    d = on_v1(key, v1)
    d.command(deploy(v2, "dep-2"))
    deliver(d, v2)
    requests = len(d.requests())
    d.command(rollback(key, "dep-2", v1, with_manifest=False))
    assert d.record_states()[-3:] == [S.ACTIVE, S.ROLLING_BACK, S.ROLLED_BACK]
    assert d.active_artifact() == v1.id and len(d.requests()) == requests
    d.command(rollback(key, "dep-2", v1, with_manifest=False))  # repeated: answered, not redone
    assert d.record_states().count(S.ROLLED_BACK) == 1 and d.events()[-1].state == S.ROLLED_BACK


def test_the_store_cap_fails_the_deployment_and_keeps_the_active_model(
    key: Ed25519PrivateKey, v1: Artifact, v2: Artifact
) -> None:
    cap = v1.manifest.total_size + v2.manifest.total_size - 1
    d = on_v1(key, v1, storage=MemorySlotStorage(store_max_bytes=cap))
    d.command(deploy(v2, "dep-2"))
    reason = refused(d, "dep-2")
    assert reason.startswith("disk_space:") and "store_max_bytes" in reason and str(cap) in reason
    assert d.active_artifact() == v1.id


def test_real_free_space_is_checked_on_disk(key: Ed25519PrivateKey, v1: Artifact, tmp_path: Path) -> None:
    huge = 1 << 62  # a reserve no disk has: the artifact cannot fit
    d = Device(key, DiskSlotStorage(tmp_path, reserve_bytes=huge), DiskRecordStore(tmp_path))
    d.start()
    d.command(deploy(v1))
    reason = refused_without_active(d)
    assert reason.startswith("disk_space: not enough disk space") and str(tmp_path) in reason


def test_a_disk_store_cap_counts_the_active_slot(
    key: Ed25519PrivateKey, v1: Artifact, v2: Artifact, tmp_path: Path
) -> None:
    cap = v1.manifest.total_size + 100
    d = Device(
        key,
        DiskSlotStorage(tmp_path, store_max_bytes=cap),
        DiskRecordStore(tmp_path),
        config=DeployConfig(store_max_bytes=cap),
    )
    d.start()
    d.command(deploy(v1, "dep-1"))
    deliver(d, v1)
    assert d.state == S.ACTIVE
    d.command(deploy(v2, "dep-2"))
    assert "model store cap" in refused(d, "dep-2")
    assert sorted(p.name for p in (tmp_path / "slots").iterdir()) == ["a", "active", "b"]
    assert not (tmp_path / "slots" / "b" / "files").exists(), "nothing was allocated for the refused artifact"


def test_sign_and_verify_use_the_same_canonical_bytes(key: Ed25519PrivateKey, v1: Artifact) -> None:
    again = SignedManifest.model_validate_json(v1.signed.model_dump_json())
    assert signing.verify(again, key.public_key(), now=1000.0).artifact_id == v1.id


def test_another_variant_of_the_installed_version_installs_but_an_older_one_does_not(
    key: Ed25519PrivateKey, bundles: dict, v1: Artifact
) -> None:
    """v1 fp32 -> v1 int8 is a switch within the version (e.g. under memory pressure), not a downgrade; v0 of
    any variant still needs a signed rollback grant."""
    d = on_v1(key, v1)
    installed = d.manager.installed()[0]
    assert installed.version == 1 and installed.variant != "int8"
    int8 = artifact(bundles["v2"], key, version=1, variant="int8")
    d.command(deploy(int8, "dep-switch"))
    assert d.state == S.DOWNLOADING
    deliver(d, int8)
    assert d.state == S.ACTIVE and d.active_artifact() == int8.id
    d.command(commit("dep-switch"))
    assert [(m.version, m.variant) for m in d.manager.installed()] == [(1, "int8")]
    older = artifact(bundles["v2"], key, version=1, variant="int8", expires_at=9999.0)  # same variant, re-signed
    d.command(deploy(older, "dep-same"))
    assert refused(d, "dep-same").startswith("older_version:")
