"""Chunk frames: verified on arrival, progress reports, requests for the missing, delta, idempotence."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.deploy.config import DeployConfig
from agent.deploy.memory import MemorySlotStorage
from agent.deploy.record import MemoryRecordStore, PersistedState
from tests.agent.deploy.harness import Artifact, Device, artifact, deliver, deploy, memory_device
from wire import chunks as frames
from wire import topics
from wire.messages import DeployState

S = DeployState


def big(key: Ed25519PrivateKey, n_chunks: int = 700, version: int = 1, seed: int = 0) -> Artifact:
    """An artifact of ``n_chunks`` small chunks (not a model: SimulatedModelOps does not load it)."""
    data = hashlib.sha256(str(seed).encode()).digest() * ((n_chunks - 1) * 1024 // 32)
    files = {"model.onnx": data, "tokenizer.json": b"{}"}
    return artifact(files, key, version=version)


def downloading(key: Ed25519PrivateKey, art: Artifact, **kw: Any) -> Device:
    d = memory_device(key, **kw)
    d.start()
    d.command(deploy(art))
    assert d.state == S.DOWNLOADING
    return d


def test_a_corrupted_chunk_is_dropped_never_written_and_asked_for_again(key: Ed25519PrivateKey, v1: Artifact) -> None:
    d = downloading(key, v1)
    assert isinstance(d.storage, MemorySlotStorage)
    d.chunk(v1.frame(1, corrupt=True), art=v1)
    assert d.manager.counters["chunks_bad"] == 1 and d.storage.writes == 0
    assert d.manager.bitmap is not None and not d.manager.bitmap.has(1)
    for index in (0, 2, 3, 4):
        d.chunk(v1.frame(index), art=v1)
    assert d.storage.writes == 4
    d.tick(2.0)  # idle: ask for what is missing
    assert [r.ranges for r in d.requests()] == [[(1, 2)]]
    d.chunk(v1.frame(1), repair=True)
    assert d.state == S.ACTIVE and d.storage.writes == 5


def test_frames_of_other_artifacts_and_malformed_frames_are_ignored(
    key: Ed25519PrivateKey, v1: Artifact, v2: Artifact
) -> None:
    d = downloading(key, v1)
    d.chunk(v2.frame(0), art=v2)
    d.chunk(b"SLMC garbage", art=v1)
    d.chunk(frames.encode(v1.id, 99, b"x"), art=v1)  # an index past the end
    assert d.manager.bitmap is not None and d.manager.bitmap.count == 0
    assert d.manager.counters["chunks_ignored"] == 1 and d.manager.drops.total == 2


def test_a_frame_is_decoded_into_a_read_only_view_of_its_payload_not_a_copy() -> None:
    """The agent hashes and writes each 256 KiB chunk from the received frame itself (issue 19)."""
    payload = bytes(range(256)) * 1024
    frame = frames.encode("ab" * 32, 7, payload)
    got = frames.decode(frame)
    assert (got.artifact_id, got.index, got.data) == ("ab" * 32, 7, payload)
    assert got.data.obj is frame and got.data.readonly
    assert hashlib.sha256(got.data).digest() == hashlib.sha256(payload).digest()
    with pytest.raises(frames.FrameError, match="payload bytes"):
        frames.decode(frame[:-1])


def test_chunks_from_the_broadcast_and_the_repair_topic_both_count(key: Ed25519PrivateKey, v1: Artifact) -> None:
    d = downloading(key, v1)
    assert topics.artifact_chunks(v1.id) in d.subscriptions and topics.chunks("dev-1") in d.subscriptions
    assert d.driver.handles(topics.artifact_chunks(v1.id)) and d.driver.handles(topics.chunks("dev-1"))
    assert not d.driver.handles(topics.chunks("dev-2"))
    for index in range(len(v1)):
        d.chunk(v1.frame(index), repair=index % 2 == 1, art=v1)
    assert d.state == S.ACTIVE
    assert topics.artifact_chunks(v1.id) not in d.subscriptions, "unsubscribed from the broadcast when done"


def test_progress_is_reported_at_start_and_at_most_once_a_second(key: Ed25519PrivateKey) -> None:
    art = big(key, 200)
    d = downloading(key, art)
    start = d.events()
    assert [e.state for e in start] == [S.DOWNLOADING, S.DOWNLOADING]
    assert start[-1].chunks_total == 200 and start[-1].chunks_have == 0
    for index in range(100):  # 100 chunks within 0.99 s: no report
        d.now += 0.0099
        d.chunk(art.frame(index), art=art)
    assert len(d.events()) == 2
    d.now += 0.02
    d.chunk(art.frame(100), art=art)
    e = d.events()[-1]
    assert len(d.events()) == 3 and e.chunks_have == 101 and e.contiguous == 101 and abs(e.progress - 101 / 200) < 1e-9
    d.tick(1.0)  # nothing new: no report
    assert len(d.events()) == 3


def test_progress_reports_do_not_rewrite_the_record_on_the_event_loop(key: Ed25519PrivateKey) -> None:
    """A slow download reports progress every second; the record (an fsync on the event loop) is written
    for state changes, not for each report: the held chunks are checkpointed by the worker instead."""
    art = big(key, 200)
    d = downloading(key, art)
    records = d.records
    assert isinstance(records, MemoryRecordStore)
    before = records.saves
    for index in range(150):  # a chunk every 0.5 s: about 75 progress reports
        d.now += 0.5
        d.chunk(art.frame(index), art=art)
    reports = [e for e in d.events() if e.state == S.DOWNLOADING]
    assert len(reports) >= 70
    assert records.saves - before == 0
    d.restart()  # a crash now: the download resumes from the checkpoint, not from zero
    assert d.state == S.DOWNLOADING and d.events()[-1].chunks_have >= 149


def test_a_crash_loop_count_is_reset_and_written_once_chunks_arrive_again(key: Ed25519PrivateKey) -> None:
    art = big(key, 50)
    d = downloading(key, art)
    d.restart()  # a start in DOWNLOADING: counted against a crash loop
    rec = d.manager.record
    assert rec is not None and rec.starts == 1
    records = d.records
    assert isinstance(records, MemoryRecordStore)
    before = records.saves
    d.now += 1.5
    d.chunk(art.frame(0), art=art)  # progress: the count goes back to 0, durably
    assert d.manager.record is not None and d.manager.record.starts == 0
    assert records.saves == before + 1 and PersistedState.model_validate_json(records._state).record.starts == 0


def test_missing_chunks_are_asked_for_in_bounded_windows_and_again_after_a_timeout(key: Ed25519PrivateKey) -> None:
    art = big(key, 700)
    d = downloading(key, art, config=DeployConfig(request_window=256, request_timeout_s=10.0))
    d.tick(1.0)
    assert d.requests() == [], "not idle yet"
    d.tick(1.0)
    (first,) = d.requests()
    assert first.ranges == [(0, 256)] and first.artifact_id == art.id
    d.tick(2.0)
    assert len(d.requests()) == 1, "the window is full: nothing more until the timeout"
    for index in range(0, 256, 2):  # half of them arrive
        d.chunk(art.frame(index), repair=True)
    d.tick(2.0)  # idle again: the free half of the window goes to the next missing chunks
    second = d.requests()[-1]
    assert second.ranges == [(256, 384)]
    d.tick(9.0)  # the odd ones never came: asked for again (the second window is not due yet)
    third = d.requests()[-1]
    assert len(third.ranges) == 128 and third.ranges[0] == (1, 2) and third.ranges[-1] == (255, 256)
    assert all(len(r.ranges) <= 256 for r in d.requests())


def test_a_lost_broadcast_is_repaired_until_the_download_completes(key: Ed25519PrivateKey) -> None:
    art = big(key, 700)
    d = downloading(key, art)
    deliver(d, art, drop=set(range(100, 650)))
    assert d.state == S.ACTIVE
    asked = sorted(i for r in d.requests() for a, b in r.ranges for i in range(a, b))
    assert asked == list(range(100, 650)), "exactly the missing chunks, each once"


def test_the_same_deploy_twice_does_not_restart_the_download(key: Ed25519PrivateKey, v1: Artifact) -> None:
    d = downloading(key, v1)
    d.chunk(v1.frame(0), art=v1)
    d.chunk(v1.frame(1), art=v1)
    bitmap = d.manager.bitmap
    d.command(deploy(v1))  # a retry, or the controller restarted and re-sent it
    assert d.manager.bitmap is bitmap and bitmap is not None and bitmap.count == 2
    assert d.record_states() == [S.IDLE, S.DOWNLOADING]
    repeat = d.events()[-1]
    assert repeat.state == S.DOWNLOADING and repeat.chunks_have == 2
    deliver(d, v1)
    d.command(deploy(v1))  # after it finished: answered with the outcome, nothing redone
    assert d.state == S.ACTIVE and d.events()[-1].state == S.ACTIVE
    assert d.record_states().count(S.ACTIVE) == 1


def test_a_new_deployment_of_the_same_artifact_resumes_the_chunks_held(key: Ed25519PrivateKey) -> None:
    art = big(key, 40)
    d = downloading(key, art)
    for index in range(30):
        d.chunk(art.frame(index), art=art)
    d.tick(1.0)  # progress checkpoints the held chunks
    d.command(deploy(art, "dep-2"))  # superseded by a new deployment id for the same artifact
    assert d.events("dep-1")[-1].state == S.CANCELLED
    assert d.manager.bitmap is not None and d.manager.bitmap.count == 30
    deliver(d, art)
    assert d.state == S.ACTIVE and d.manager.counters["chunks_received"] == 40


def test_delta_a_new_version_fetches_only_the_chunks_that_changed(
    key: Ed25519PrivateKey, v1: Artifact, v2: Artifact
) -> None:
    d = memory_device(key)
    d.start()
    d.command(deploy(v1, "dep-1"))
    deliver(d, v1, drop=set(range(len(v1))))  # everything through requests, to count them
    assert d.state == S.ACTIVE
    asked_before = len(d.requests())
    old = {ref.sha256 for ref in v1.manifest.chunks}
    changed = [ref.index for ref in v2.manifest.chunks if ref.sha256 not in old]
    assert 0 < len(changed) < len(v2), "the fixture's v2 changes some chunks and keeps the tokenizer"
    d.command(deploy(v2, "dep-2"))
    deliver(d, v2, drop=set(range(len(v2))))
    assert d.state == S.ACTIVE and d.active_artifact() == v2.id
    asked = sorted(i for r in d.requests()[asked_before:] for a, b in r.ranges for i in range(a, b))
    assert asked == changed
    assert d.manager.counters["copied"] == len(v2) - len(changed)
