"""Commands sealed for one device (wire.signing) and the agent's guard (agent.core.guard)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.core import AgentCore, CoreConfig, Publish, TelemetrySample
from agent.core.guard import CommandGuard, MemoryNonceStore
from agent.runtime.nonces import DiskNonceStore
from wire import codec, signing, topics
from wire.messages import Configure, HardwareProfile, Ping
from wire.signing import CommandBody, VerificationError

KEY = Ed25519PrivateKey.generate()
NOW = time.time()


def configure(interval: float = 5.0, command_id: str = "c-1") -> Configure:
    return Configure(ts=NOW, command_id=command_id, telemetry_interval_s=interval)


def seal(command: object, device: str = "dev-1", now: float = NOW, ttl: float = 600.0, key=KEY) -> bytes:  # type: ignore[no-untyped-def]
    return signing.seal_command(command, key, device_id=device, now=now, ttl_s=ttl)  # type: ignore[arg-type]


def admit(guard: CommandGuard, payload: bytes, now: float = NOW) -> None:
    obj, _ = codec.parse_command(payload)
    guard.admit(obj, now)


def reason(guard: CommandGuard, payload: bytes, now: float = NOW) -> str:
    with pytest.raises(VerificationError) as info:
        admit(guard, payload, now)
    return info.value.reason


def test_a_sealed_command_is_admitted_once_and_only_by_its_device() -> None:
    payload = seal(configure())
    guard = CommandGuard("dev-1", KEY.public_key())
    admit(guard, payload)
    assert reason(guard, payload) == "replay"
    assert reason(CommandGuard("dev-2", KEY.public_key()), payload) == "wrong_device"
    assert reason(CommandGuard("dev-1", Ed25519PrivateKey.generate().public_key()), seal(configure())) == "wrong_key"
    assert reason(CommandGuard("dev-1", None), seal(configure())) == "no_key"
    assert reason(guard, codec.encode(configure())) == "unsigned"


def test_expiry_and_overlong_validity_are_refused() -> None:
    guard = CommandGuard("dev-1", KEY.public_key())
    assert reason(guard, seal(configure(), now=NOW - 7200, ttl=3600)) == "expired"
    admit(guard, seal(configure(), now=NOW - 7200, ttl=3600), now=NOW - 7000)  # on time, it was fine
    # a signature over a validity beyond the protocol's limit (seal_command itself caps it)
    obj = json.loads(seal(configure()))
    auth = dict(obj["auth"], expires_at=NOW + signing.MAX_COMMAND_TTL_S + 10, nonce="f" * 32)
    digest = signing.body_digest(obj)
    auth["signature"] = signing.base64.b64encode(KEY.sign(signing.command_signed_bytes(auth, digest))).decode()
    assert reason(guard, json.dumps({**obj, "auth": auth}).encode()) == "too_long"


def test_any_change_to_a_sealed_command_breaks_its_signature() -> None:
    guard = CommandGuard("dev-1", KEY.public_key())
    genuine = json.loads(seal(configure(interval=30.0)))
    changed = [
        {**genuine, "telemetry_interval_s": 0.1},  # a known field
        {**genuine, "surprise": True},  # a field this schema does not know (still covered by the digest)
        {**genuine, "auth": {**genuine["auth"], "device_id": "dev-2"}},  # rebinding it
        {**genuine, "auth": {**genuine["auth"], "expires_at": genuine["auth"]["expires_at"] + 3600}},
        {**json.loads(codec.encode(configure(interval=0.1))), "auth": genuine["auth"]},  # auth on another body
    ]
    for obj in changed:
        assert reason(guard, json.dumps(obj).encode()) == "bad_signature", obj


def test_fields_a_newer_controller_adds_are_signed_and_ignored() -> None:
    obj = {**configure().model_dump(mode="json", exclude_none=True, exclude={"auth"}), "future_field": [1, 2]}
    body = CommandBody(json.dumps(obj).encode(), signing.body_digest(obj))
    payload = seal(body)
    admit(CommandGuard("dev-1", KEY.public_key()), payload)
    _, command = codec.parse_command(payload)
    assert isinstance(command, Configure) and command.telemetry_interval_s == 5.0


def test_the_memory_survives_a_restart_on_disk(tmp_path: Path) -> None:
    payload = seal(configure())
    admit(CommandGuard("dev-1", KEY.public_key(), DiskNonceStore(tmp_path)), payload)
    restarted = CommandGuard("dev-1", KEY.public_key(), DiskNonceStore(tmp_path))
    assert reason(restarted, payload) == "replay"
    assert (tmp_path / "command-nonces.json").stat().st_mode & 0o777 == 0o600
    (tmp_path / "command-nonces.json").write_text("{not json")
    damaged = CommandGuard("dev-1", KEY.public_key(), DiskNonceStore(tmp_path))
    assert reason(damaged, payload) == "replay", "a damaged memory refuses what was issued before it was lost"
    admit(damaged, seal(configure(), now=time.time() + 1), now=time.time() + 1)


def test_the_memory_is_bounded_and_forgotten_commands_stay_refused() -> None:
    store = MemoryNonceStore()
    guard = CommandGuard("dev-1", KEY.public_key(), store, max_remembered=3)
    sealed = [seal(configure(command_id=f"c-{i}"), now=NOW + i) for i in range(5)]
    for payload in sealed:
        admit(guard, payload, now=NOW + 10)
    assert len(guard.memory.seen) == 3 and store.saves == 5
    assert [reason(guard, p, now=NOW + 10) for p in sealed] == ["replay"] * 5  # the evicted two by the floor
    # expired nonces are dropped from the memory, and their commands stay refused if the clock goes back
    assert reason(guard, sealed[4], now=NOW + 1000) == "expired"
    assert guard.memory.seen == {}
    assert reason(guard, sealed[4], now=NOW + 10) == "replay"


def test_the_core_obeys_only_admitted_commands_and_reports_refusals_sparingly() -> None:
    core = AgentCore(
        CoreConfig(device_id="dev-1", agent_version="t"),
        HardwareProfile(cpu_count=1, ram_bytes=2**30, arch="x86_64", os="Linux"),
        lambda dt: TelemetrySample(cpu_percent=0, rss_bytes=0),
        started_at=NOW,
        guard=CommandGuard("dev-1", KEY.public_key()),
    )
    cmd = topics.cmd("dev-1")
    reports: list[Publish] = []
    for i in range(20):  # a flood of unsigned configures
        reports += core.on_message(cmd, codec.encode(configure(interval=0.1, command_id=f"x-{i}")), NOW + i)  # type: ignore[arg-type]
    assert core.config.telemetry_interval_s == 10.0
    assert len(reports) == 1 and not reports[0].durable, "one undurable report a minute per reason"
    event = codec.decode(topics.DeviceChannel.EVENTS, reports[0].payload)
    assert event.kind == "command_refused" and "unsigned" in event.message
    assert core.drops.counts[("cmd", "unsigned")] == 20
    assert len(core.on_message(cmd, codec.encode(configure(command_id="x-late")), NOW + 61)) == 1  # a minute later
    # ping needs no signature; the signed configure is obeyed and acknowledged
    assert core.on_message(cmd, codec.encode(Ping(ts=NOW, command_id="p")), NOW)
    actions = core.on_message(cmd, seal(configure(interval=2.0)), NOW)
    assert core.config.telemetry_interval_s == 2.0 and len(actions) == 2
