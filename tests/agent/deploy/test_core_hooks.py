"""AgentCore routes deployment commands and chunk frames to the driver and reports the true installed models."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.core import AgentCore, CoreConfig, Publish, Subscribe, TelemetrySample, Unsubscribe
from agent.core.guard import CommandGuard
from agent.deploy.driver import DeploymentDriver
from agent.deploy.jobs import JobRunner
from agent.deploy.manager import DeploymentManager
from agent.deploy.memory import MemorySlotStorage
from agent.deploy.record import MemoryRecordStore
from tests.agent.deploy.fake_ops import SimulatedModelOps
from tests.agent.deploy.harness import Artifact, deploy, sealed
from wire import codec, topics
from wire.messages import DeploymentEvent, DeployState, HardwareProfile, InstalledModel
from wire.topics import DeviceChannel

HW = HardwareProfile(cpu_count=1, ram_bytes=2**30, arch="aarch64", os="Linux")


def make_core(key: Ed25519PrivateKey, with_deployments: bool = True) -> tuple[AgentCore, DeploymentDriver | None]:
    driver = None
    if with_deployments:
        storage = MemorySlotStorage()
        manager = DeploymentManager("dev-1", storage, MemoryRecordStore(), key.public_key())
        driver = DeploymentDriver(manager, JobRunner(storage, SimulatedModelOps()), threaded=False, clock=lambda: 50.0)
    core = AgentCore(
        CoreConfig(device_id="dev-1", agent_version="t"),
        HW,
        lambda dt: TelemetrySample(cpu_percent=0, rss_bytes=0),
        started_at=0.0,
        deployments=driver,
        guard=CommandGuard("dev-1", key.public_key()),
    )
    return core, driver


def decode(action: Publish) -> object:
    channel = DeviceChannel.STATE if action.topic == topics.state("dev-1") else DeviceChannel.EVENTS
    return codec.decode(channel, action.payload)


def test_commands_and_chunks_reach_the_driver_and_the_birth_tells_the_truth(
    key: Ed25519PrivateKey, v1: Artifact
) -> None:
    core, driver = make_core(key)
    assert driver is not None
    actions = core.on_connected(10.0)
    assert actions[0] == Subscribe(topics.cmd("dev-1"), 1) and Subscribe(topics.chunks("dev-1"), 1) in actions
    assert decode(actions[-1]).installed == []  # type: ignore[attr-defined, arg-type]

    actions = core.on_message(topics.cmd("dev-1"), sealed(deploy(v1), key), 11.0)
    assert Subscribe(topics.artifact_chunks(v1.id), 1) in actions
    events = [decode(a) for a in actions if isinstance(a, Publish)]
    assert [e.state for e in events if isinstance(e, DeploymentEvent)] == [DeployState.DOWNLOADING] * 2

    out: list[object] = []
    for index in range(len(v1)):
        out += core.on_message(topics.artifact_chunks(v1.id), v1.frame(index), 12.0)
    assert core.drops.total == 0, "binary frames are not parsed as JSON commands"
    assert Unsubscribe(topics.artifact_chunks(v1.id)) in out
    births = [decode(a) for a in out if isinstance(a, Publish) and a.retain]
    assert len(births) == 1, "a fresh retained birth once the new model serves"
    (model,) = births[0].installed  # type: ignore[attr-defined]
    assert (model.model, model.version, model.artifact, model.active) == ("tiny-cls", 1, v1.id, True)
    assert decode(core.birth(13.0)).installed == births[0].installed  # type: ignore[attr-defined]


def test_the_core_wakes_up_for_the_deployments_timers(key: Ed25519PrivateKey, v1: Artifact) -> None:
    core, driver = make_core(key)
    assert core.next_wakeup() == 10.0  # telemetry
    core.on_message(topics.cmd("dev-1"), sealed(deploy(v1), key), 1.0)
    assert driver is not None and core.next_wakeup() == 1.0 + driver.manager.config.chunk_idle_s
    requests = [decode(a) for a in core.tick(3.5) if isinstance(a, Publish) and not a.durable]
    assert [r.type for r in requests] == ["chunks"]  # type: ignore[attr-defined]


def test_without_deployments_a_deploy_is_refused_with_a_reason(key: Ed25519PrivateKey, v1: Artifact) -> None:
    core, _ = make_core(key, with_deployments=False)
    (ack,) = core.on_message(topics.cmd("dev-1"), sealed(deploy(v1), key), 1.0)
    msg = decode(ack)  # type: ignore[arg-type]
    assert msg.type == "ack" and not msg.ok and "does not take deployments" in msg.detail  # type: ignore[attr-defined]


def test_a_driver_attached_later_reports_slots_and_falls_back_to_the_static_model(
    key: Ed25519PrivateKey, v1: Artifact
) -> None:
    static = [InstalledModel(model="configured", version=1, variant="fp32", active=True)]
    core = AgentCore(
        CoreConfig(device_id="dev-1", agent_version="t"),
        HW,
        lambda dt: TelemetrySample(cpu_percent=0, rss_bytes=0),
        started_at=0.0,
        installed=lambda: static,
        guard=CommandGuard("dev-1", key.public_key()),
    )
    _, driver = make_core(key)
    assert driver is not None
    core.attach_deployments(driver)
    assert decode(core.birth(1.0)).installed == static  # type: ignore[attr-defined]
    core.on_message(topics.cmd("dev-1"), sealed(deploy(v1), key), 1.0)
    for index in range(len(v1)):
        core.on_message(topics.artifact_chunks(v1.id), v1.frame(index), 2.0)
    (model,) = decode(core.birth(3.0)).installed  # type: ignore[attr-defined]
    assert (model.model, model.artifact, model.slot) == ("tiny-cls", v1.id, "a")
