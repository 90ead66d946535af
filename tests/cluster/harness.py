"""Controller replicas as real processes (``slmfleet up --replica``) on one PostgreSQL database and one broker."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, text

from controller.broker.embedded import free_port
from tests.e2e.fleet import ControllerProc, Fleet
from tests.helpers import Proc, slmfleet_cmd, wait_until

#: rollouts in these tests judge the takeover, not the model
NO_GATES = {"error_rate_max": None, "p95_latency_ratio_max": None, "rss_ratio_max": None, "shadow_agreement_min": None}


@dataclass
class Replica:
    id: str
    proc: Proc
    api: str
    data_dir: Path

    @property
    def token(self) -> str:
        return (self.data_dir / "admin-token").read_text().strip()

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.api + path, timeout=10, **kw)

    def cluster(self) -> dict[str, Any]:
        return self.get("/api/v1/cluster", headers={"Authorization": f"Bearer {self.token}"}).json()  # type: ignore[no-any-return]


@dataclass
class Cluster:
    root: Path
    database_url: str
    broker_url: str
    lease_ttl_s: float = 6.0
    replicas: dict[str, Replica] = field(default_factory=dict)
    #: more settings for every replica started from now on (SLMFLEET_* variables)
    env: dict[str, str] = field(default_factory=dict)

    def start(self, replica_id: str) -> Replica:
        """Start one replica (or start it again, on its data directory); artifacts and the signing key come from
        the database (artifact_store database, the default with --replica)."""
        data = self.root / replica_id
        port = free_port()
        env = {
            "SLMFLEET_DATABASE_URL": self.database_url,
            "SLMFLEET_MQTT_CLIENT_ID": f"slmfleet-{replica_id}",
            "SLMFLEET_MQTT_SHARED_GROUP": "controllers",
            "SLMFLEET_LEASE_TTL_S": str(self.lease_ttl_s),
            **self.env,
        }
        args = ("up", "--replica", "--replica-id", replica_id, "--data-dir", str(data), "--broker", self.broker_url)
        proc = Proc(slmfleet_cmd(*args, "--port", str(port)), self.root / f"{replica_id}.log", env=env)
        replica = Replica(replica_id, proc, f"http://127.0.0.1:{port}", data)
        self.replicas[replica_id] = replica

        def up() -> bool:
            assert proc.alive(), proc.log()[-3000:]
            health = httpx.get(replica.api + "/api/v1/health", timeout=2).json()
            return bool(health["broker"]["connected"])

        wait_until(up, 60, interval=0.2, what=f"replica {replica_id} up (log {proc.log_path})")
        return replica

    def stop(self) -> None:
        for replica in self.replicas.values():
            replica.proc.stop(20)

    def any_alive(self) -> Replica:
        return next(r for r in self.replicas.values() if r.proc.alive())


def holder(engine: Engine, name: str) -> tuple[str, int] | None:
    """The replica holding a live lease and its token (the database's clock)."""
    with engine.connect() as conn:
        now = "EXTRACT(EPOCH FROM clock_timestamp())"
        row = conn.execute(
            text(f"SELECT holder, token FROM cluster_lease WHERE name = :n AND expires_at > {now}"), {"n": name}
        ).first()
    return (str(row[0]), int(row[1])) if row else None


def start_pumps(fleet: Fleet, devices: list[str], key: Path, *extra: str) -> None:
    """Real agents labelled fleet=pumps, pinning the replicas' signing key, all online."""
    for d in devices:
        fleet.start_agent(d, "--signing-key-file", str(key), "--label=fleet=pumps", *extra)
    fleet.wait_online(devices, 60)


def start_rollout(ctl: ControllerProc, version: int, waves: list[dict[str, Any]]) -> str:
    """A gate-less rollout of pump@version (fp32) over fleet=pumps; its id."""
    spec = {
        "model": "pump",
        "version": version,
        "variant": "fp32",
        "selector": "fleet=pumps",
        "waves": waves,
        "gates": NO_GATES,
    }
    r = httpx.post(
        ctl.api + "/api/v1/rollouts", json=spec, headers={"Authorization": f"Bearer {ctl.token}"}, timeout=30
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])
