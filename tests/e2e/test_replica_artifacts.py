"""Two controller replicas on one PostgreSQL database with a shared artifact store (the database, or a directory
both mount): a version imported through replica A is delivered by replica B, which never imported it, to a real
agent that pins B's key.

B reads the manifest and every chunk from the shared store (its own data directory holds no blob and no key
file), signs with the key the replicas share (encrypted there with shared_secrets_key), and the agent verifies,
installs and activates the model. A replica without that key refuses to start and says which setting it needs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet

from controller.broker.embedded import EmbeddedBroker, free_port
from tests.e2e.fleet import ControllerProc
from tests.e2e.test_deploy_real_agents import active_version, deploy, deployment, pin_key, register
from tests.helpers import Proc, slmfleet_cmd, wait_until
from tests.postgres import own_database

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture
def database_url() -> Iterator[str]:
    with own_database("slmfleet_replicas") as url:
        yield url


#: the Fernet key every replica is given: the shared signing key is encrypted in the database
SECRETS_KEY = Fernet.generate_key().decode()


def replica_proc(
    root: Path, name: str, broker_url: str, database_url: str, secrets_key: str | None, store: str = "database"
) -> ControllerProc:
    port = free_port()
    data = root / name
    env = {
        "SLMFLEET_DATABASE_URL": database_url,
        "SLMFLEET_ARTIFACT_STORE": store,
        "SLMFLEET_MQTT_CLIENT_ID": f"slmfleet-controller-{name}",
        "SLMFLEET_CHUNK_SIZE": "4096",  # many chunks: every one is a row B reads
    }
    if secrets_key is not None:
        env["SLMFLEET_SHARED_SECRETS_KEY"] = secrets_key
    args = slmfleet_cmd("up", "--data-dir", str(data), "--broker", broker_url, "--port", str(port))
    proc = Proc(args, root / f"{name}.log", env=env)
    return ControllerProc(proc, f"http://127.0.0.1:{port}", data)


def start_replica(root: Path, name: str, broker_url: str, database_url: str, store: str) -> ControllerProc:
    ctl = replica_proc(root, name, broker_url, database_url, SECRETS_KEY, store)
    proc = ctl.proc
    try:
        wait_until(
            lambda: proc.alive() and httpx.get(ctl.api + "/api/v1/health", timeout=2).json()["broker"]["connected"],
            60,
            what=f"replica {name} up (log: {proc.log_path})",
        )
    except AssertionError:
        proc.stop(20)
        raise
    return ctl


@pytest.mark.parametrize("store", ["database", "shared-directory"])
def test_a_replica_that_never_imported_a_version_delivers_it_signed_with_the_shared_key(
    tmp_path: Path, private_broker: EmbeddedBroker, database_url: str, store: str
) -> None:
    store = "database" if store == "database" else str(tmp_path / "mnt" / "artifacts")  # the directory both mount
    procs: list[Proc] = []
    try:
        a = start_replica(tmp_path, "replica-a", private_broker.url, database_url, store)
        procs.append(a.proc)
        version = register(a, tmp_path, seed=1)
        assert version["number"] == 1
        b = start_replica(tmp_path, "replica-b", private_broker.url, database_url, store)  # after the import
        procs.append(b.proc)

        key_a = a.get("/api/v1/signing-key").json()
        key_b = b.get("/api/v1/signing-key").json()
        assert key_a == key_b, "every replica serves the one public key"
        assert not (b.data_dir / "keys" / "signing-key.pem").exists(), "B's key came from the database"
        assert b.get("/api/v1/models/pump").status_code == 200

        key_file = pin_key(b, tmp_path / "pinned.pem")
        agent = Proc(
            slmfleet_cmd(
                "agent",
                "--broker",
                private_broker.url,
                "--device-id",
                "edge-r",
                "--data-dir",
                str(tmp_path / "edge-r"),
                "--reconnect-max",
                "1",
                "--signing-key-file",
                str(key_file),
            ),
            tmp_path / "edge-r.log",
        )
        procs.append(agent)
        wait_until(lambda: b.devices().get("edge-r") == "online", 60, what="agent online at replica B")

        dep = deploy(b, 1, ["edge-r"])  # B drives the deployment: its Deploy command, its chunks
        done = wait_until(
            lambda: (d := deployment(b, dep))["status"] in ("completed", "failed") and d, 120, what="deployment done"
        )
        assert done["status"] == "completed", done
        target = done["targets"][0]
        assert target["state"] == "active" and target["chunks_have"] == target["chunks_total"] > 10, target
        wait_until(lambda: active_version(b, "edge-r") == 1, 30, what="version 1 active on the device")
        assert a.get(f"/api/v1/deployments/{dep}").json()["status"] == "completed", "the state is the shared one"
        local_store = b.data_dir / "registry" / "store" / "blobs"
        assert not local_store.exists() or not any(local_store.rglob("*")), "B sent nothing from a local copy"
        if store != "database":
            assert any(p.is_file() for p in (Path(store) / "blobs").rglob("*")), "the files are in the shared directory"
        log = agent.log()
        assert "Traceback" not in log and "signature" not in log.lower(), log[-3000:]

        # a replica started without the key that encrypts the shared secrets refuses to start, naming the setting
        c = replica_proc(tmp_path, "replica-c", private_broker.url, database_url, None, store)
        procs.append(c.proc)
        assert c.proc.popen.wait(60) == 1
        assert "set shared_secrets_key" in c.proc.log(), c.proc.log()[-2000:]
    finally:
        for p in reversed(procs):
            with contextlib.suppress(Exception):
                p.stop(20)
