"""Killed in every state: a new agent built from what is on disk ends on the new model or the old one, never none.

Each case runs a device on real disk storage with real ONNX models up to the moment the record of
state X has been written, kills it there (before any side effect of X), then builds a new manager,
driver and ModelHost from the data directory, as a restarted process would, and lets it finish.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.deploy.bitmap import ChunkBitmap
from agent.deploy.config import DeployConfig
from agent.deploy.disk import DiskSlotStorage
from agent.deploy.record import DiskRecordStore
from tests.agent.deploy.harness import (
    Artifact,
    Device,
    Killed,
    artifact,
    deliver,
    deploy,
    host_ops,
    rollback,
)
from tests.helpers import wait_until
from wire.manifest import ChunkRef, SignedManifest
from wire.messages import DeployState, ShadowSpec

S = DeployState
SHADOW = ShadowSpec(sample_rate=1.0, min_samples=1000, max_duration_s=30)


class KillingStorage(DiskSlotStorage):
    """Disk slots that can kill the agent at chosen moments: right after the pointer moved to a slot
    (mid-switch, before the host serves it), or while a slot is prepared."""

    kill_after_pointer_to: str | None = None
    kill_in_begin = False

    def set_active(self, slot: str | None) -> None:
        super().set_active(slot)
        if slot is not None and slot == self.kill_after_pointer_to:
            raise Killed(f"killed after the pointer moved to slot {slot}")

    def begin(self, slot: str, signed: SignedManifest) -> ChunkBitmap:
        if self.kill_in_begin:
            raise Killed("killed while preparing the slot")
        return super().begin(slot, signed)


def on_v1(key: Ed25519PrivateKey, root: Path, v1: Artifact, config: DeployConfig | None = None) -> Device:
    d = Device(key, KillingStorage(root), DiskRecordStore(root), make_ops=host_ops, config=config or DeployConfig())
    d.start()
    d.command(deploy(v1, "dep-0"))
    deliver(d, v1)
    assert d.state == S.ACTIVE
    return d


def serving(d: Device) -> str | None:
    current = d.host.current()
    return current.artifact_id if current is not None else None


def finish(d: Device, art: Artifact) -> None:
    """Play the controller until the deployment stops moving: repairs while downloading, time in SHADOW."""
    for _ in range(10):
        if d.state == S.DOWNLOADING:
            deliver(d, art)
        elif d.state == S.SHADOW:
            d.tick(SHADOW.max_duration_s + 1)
            wait_until(lambda: d.tick() != S.SHADOW, 20, what="shadow run ended")
        else:
            return


def assert_consistent(d: Device, expected: Artifact) -> None:
    """Serving ``expected``; the pointer, the host and the birth's installed list agree."""
    assert serving(d) == expected.id, "the host serves the expected model"
    assert d.active_artifact() == expected.id, "the pointer names it"
    installed = d.manager.installed()
    assert installed[0].active and installed[0].artifact == expected.id
    fresh = Device(d.key, DiskSlotStorage(d.storage.root), DiskRecordStore(d.storage.root))  # type: ignore[attr-defined]
    assert fresh.manager.installed() == installed, "the birth after another restart reports the same truth"


Steps = Callable[[Device, Artifact, Artifact, Artifact, Ed25519PrivateKey], None]


def deploy_v2(d: Device, v1: Artifact, v2: Artifact, broken: Artifact, key: Ed25519PrivateKey) -> None:
    d.command(deploy(v2, "dep-2"))
    finish(d, v2)


def deploy_v2_shadow(d: Device, v1: Artifact, v2: Artifact, broken: Artifact, key: Ed25519PrivateKey) -> None:
    d.command(deploy(v2, "dep-2", shadow=SHADOW))
    finish(d, v2)


def deploy_broken(d: Device, v1: Artifact, v2: Artifact, broken: Artifact, key: Ed25519PrivateKey) -> None:
    d.command(deploy(broken, "dep-2"))
    finish(d, broken)


def deploy_v2_then_cancel(d: Device, v1: Artifact, v2: Artifact, broken: Artifact, key: Ed25519PrivateKey) -> None:
    from tests.agent.deploy.harness import cancel

    d.command(deploy(v2, "dep-2", activate=False))
    finish(d, v2)
    d.command(cancel("dep-2"))


def roll_back(d: Device, v1: Artifact, v2: Artifact, broken: Artifact, key: Ed25519PrivateKey) -> None:
    d.command(rollback(key, "dep-2", v1, with_manifest=False))


# (killed in, what runs before the kill is armed, what runs with it armed, the model it ends on)
CASES: list[tuple[DeployState, Steps | None, Steps, str]] = [
    (S.DOWNLOADING, None, deploy_v2, "v2"),
    (S.VERIFYING, None, deploy_v2, "v2"),
    (S.STAGED, None, deploy_v2, "v2"),
    (S.SHADOW, None, deploy_v2_shadow, "v2"),
    (S.ACTIVATING, None, deploy_v2, "v2"),
    (S.ACTIVE, None, deploy_v2, "v2"),
    (S.FAILED, None, deploy_broken, "v1"),
    (S.CANCELLED, None, deploy_v2_then_cancel, "v1"),
    (S.ROLLING_BACK, deploy_v2, roll_back, "v1"),
    (S.ROLLED_BACK, deploy_v2, roll_back, "v1"),
]


@pytest.mark.parametrize(("killed_in", "before", "steps", "ends_on"), CASES, ids=[c[0].value for c in CASES])
def test_killed_in_state_resumes_to_a_working_model(
    killed_in: DeployState,
    before: Steps | None,
    steps: Steps,
    ends_on: str,
    key: Ed25519PrivateKey,
    data_dir: Path,
    bundles: dict,
    v1: Artifact,
    v2: Artifact,
) -> None:
    broken = artifact(dict(bundles["v2"], **{"model.onnx": b"not onnx" * 200}), key, version=2)
    expected = {"v1": v1, "v2": v2}[ends_on]
    d = on_v1(key, data_dir, v1)
    if before is not None:
        before(d, v1, v2, broken, key)
    d.crashing.crash_in = killed_in
    with pytest.raises(Killed):
        steps(d, v1, v2, broken, key)
    persisted = DiskRecordStore(data_dir).load().record
    assert persisted is not None and persisted.state == killed_in, "the record was written before the kill"

    d.restart()  # a new process: new manager, driver and ModelHost over the same data directory
    assert serving(d) is not None, "serving a model right after the restart"
    finish(d, broken if steps is deploy_broken else v2)
    assert d.state in (S.ACTIVE, S.FAILED, S.ROLLED_BACK, S.CANCELLED)
    assert_consistent(d, expected)
    if ends_on == "v2":
        assert d.state == S.ACTIVE
        assert d.record_states()[-1] == S.ACTIVE and killed_in in d.record_states()


def test_killed_mid_switch_after_the_pointer_moved_finishes_the_switch(
    key: Ed25519PrivateKey, data_dir: Path, v1: Artifact, v2: Artifact
) -> None:
    d = on_v1(key, data_dir, v1)
    storage = d.storage
    assert isinstance(storage, KillingStorage)
    storage.kill_after_pointer_to = "b"
    with pytest.raises(Killed):
        deploy_v2(d, v1, v2, v2, key)
    assert storage.active_slot() == "b" and DiskRecordStore(data_dir).load().record.state == S.ACTIVATING  # type: ignore[union-attr]
    storage.kill_after_pointer_to = None
    d.restart()
    assert d.state == S.ACTIVE and d.record_states()[-3:] == [S.ACTIVATING, S.ACTIVATING, S.ACTIVE]
    assert_consistent(d, v2)


def test_a_switch_that_kills_the_agent_every_time_is_given_up_and_the_old_model_restored(
    key: Ed25519PrivateKey, data_dir: Path, v1: Artifact, v2: Artifact
) -> None:
    d = on_v1(key, data_dir, v1, DeployConfig(max_starts=3))
    storage = d.storage
    assert isinstance(storage, KillingStorage)
    storage.kill_after_pointer_to = "b"  # e.g. the new model crashes onnxruntime as it starts serving
    with pytest.raises(Killed):
        deploy_v2(d, v1, v2, v2, key)
    for attempt in range(1, 4):
        with pytest.raises(Killed):
            d.restart()
        assert DiskRecordStore(data_dir).load().record.starts == attempt  # type: ignore[union-attr]
    d.restart()  # the fourth start in ACTIVATING: over the limit
    assert d.state == S.FAILED
    assert d.record_states()[-3:] == [S.ACTIVATING, S.ROLLING_BACK, S.FAILED]
    assert "started 4 times in state activating" in d.events("dep-2")[-1].reason
    assert_consistent(d, v1)


def test_a_crash_loop_while_preparing_the_download_fails_it_and_keeps_serving(
    key: Ed25519PrivateKey, data_dir: Path, v1: Artifact, v2: Artifact
) -> None:
    d = on_v1(key, data_dir, v1, DeployConfig(max_starts=2))
    storage = d.storage
    assert isinstance(storage, KillingStorage)
    storage.kill_in_begin = True
    with pytest.raises(Killed):
        d.command(deploy(v2, "dep-2"))
    for _ in range(2):
        with pytest.raises(Killed):
            d.restart()
    d.restart()
    assert d.state == S.FAILED and "without progress" in d.events("dep-2")[-1].reason
    assert_consistent(d, v1)


def test_an_unconfirmed_model_that_keeps_crashing_the_agent_is_rolled_back_but_a_healthy_one_is_not(
    key: Ed25519PrivateKey, data_dir: Path, v1: Artifact, v2: Artifact
) -> None:
    d = on_v1(key, data_dir, v1, DeployConfig(max_starts=2, healthy_after_s=60))
    deploy_v2(d, v1, v2, v2, key)
    assert d.state == S.ACTIVE
    d.restart()
    d.tick(61)  # served a minute: healthy, restarts from now on are not its fault
    for _ in range(2):
        d.restart()
    assert d.state == S.ACTIVE and serving(d) == v2.id
    d.restart()  # the third quick restart in a row: over the limit of 2
    assert d.state == S.FAILED and d.record_states()[-3:] == [S.ACTIVE, S.ROLLING_BACK, S.FAILED]
    assert_consistent(d, v1)


def test_a_download_killed_half_way_keeps_the_chunks_on_disk(key: Ed25519PrivateKey, data_dir: Path) -> None:
    data = bytes(range(256)) * 4 * 60  # 60 chunks of 1 KiB
    big = artifact({"model.onnx": data, "tokenizer.json": b"{}"}, key, version=2)
    d = Device(key, DiskSlotStorage(data_dir), DiskRecordStore(data_dir))  # simulated models: bytes only
    d.start()
    d.command(deploy(big, "dep-2"))
    for index in range(40):
        d.chunk(big.frame(index), art=big)
    d.tick(1.0)  # a progress report checkpoints the 40 chunks
    for index in range(40, 45):
        d.chunk(big.frame(index), art=big)  # written after the checkpoint: fetched again
    d.restart()  # killed (nothing in memory survives)
    assert d.state == S.DOWNLOADING and d.manager.bitmap is not None and d.manager.bitmap.count == 40
    deliver(d, big, drop=set(range(len(big))))
    asked = sorted(i for r in d.requests() for a, b in r.ranges for i in range(a, b))
    assert asked == list(range(40, len(big)))
    assert d.state == S.ACTIVE and d.active_artifact() == big.id


class CountingStorage(DiskSlotStorage):
    """Disk slots that count what the verification reads back."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.read_back: list[int] = []
        self.files_hashed = 0

    def chunk_sha256(self, slot: str, ref: ChunkRef) -> str:
        self.read_back.append(ref.index)
        return super().chunk_sha256(slot, ref)

    def file_sha256(self, slot: str, file_index: int) -> str:
        self.files_hashed += 1
        return super().file_sha256(slot, file_index)


def test_chunks_checked_on_arrival_are_not_read_back_but_those_held_before_a_restart_are(
    key: Ed25519PrivateKey, data_dir: Path
) -> None:
    data = bytes(range(256)) * 4 * 60  # 60 chunks of 1 KiB
    big = artifact({"model.onnx": data, "tokenizer.json": b"{}"}, key, version=2)
    storage = CountingStorage(data_dir)
    d = Device(key, storage, DiskRecordStore(data_dir))  # simulated models: bytes only
    d.start()
    d.command(deploy(big, "dep-2"))
    for index in range(40):
        d.chunk(big.frame(index), art=big)
    d.tick(1.0)  # a progress report checkpoints the 40 chunks (fsync first, then the held bitmap)
    d.restart()  # killed (nothing in memory survives)
    assert d.manager.bitmap is not None and d.manager.bitmap.count == 40
    # While the agent was down, a held chunk rotted on disk.
    slot = d.manager.record.target_slot if d.manager.record else None
    assert slot is not None
    ref = big.manifest.chunks[7]
    with open(data_dir / "slots" / slot / "files" / "model.onnx", "r+b") as f:
        f.seek(ref.offset)
        f.write(b"\xff" * 16)
    storage.read_back.clear()
    deliver(d, big, drop=set())
    # The 40 chunks held from before the restart were read back and checked; the 21 received after it were
    # not; the rotten one was found and fetched again, then read back itself (the repair download began a
    # fresh round that received only it).
    first_pass = storage.read_back[:40]
    assert sorted(first_pass) == list(range(40)), storage.read_back
    assert 7 in {i for r in d.requests() for a, b in r.ranges for i in range(a, b)}
    assert storage.files_hashed == 0  # every file is covered by its chunks
    assert d.state == S.ACTIVE and d.active_artifact() == big.id
    assert (data_dir / "slots" / slot / "files" / "model.onnx").read_bytes() == data


def test_only_chunks_that_tile_a_file_exactly_stand_for_its_hash(key: Ed25519PrivateKey) -> None:
    from agent.deploy.jobs import covers

    refs = list(artifact({"model.onnx": bytes(3000), "tokenizer.json": b"{}"}, key).manifest.chunks)[:3]
    assert len(refs) == 3 and covers(refs, 3000) and covers(refs[::-1], 3000)
    assert not covers(refs[1:], 3000)  # a gap at the start
    assert not covers(refs[:-1], 3000)  # the end is not covered
    assert not covers(refs, 3001)  # the file is longer than its chunks
    assert not covers([*refs, refs[-1]], 3000)  # an overlap
    assert not covers([], 0)  # no chunks: the file's own sha256 decides
