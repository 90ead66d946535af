"""``python -m agent.inference.probe``: the device pipeline measured in a process of its own (what the
importer runs for latency and peak memory), and the controller's runner of it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from controller.registry.convert import ConversionError
from controller.registry.convert.probe import run_probe
from tests import bundles
from wire.manifest import RunSpec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def anomaly(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bundles.build("anomaly", tmp_path_factory.getbasetemp() / "agent-bundles")


def windows(n: int) -> list[dict[str, list[float]]]:
    rng = np.random.default_rng(7)
    return [{"values": [float(v) for v in rng.normal(0.0, 1.0, 32)]} for _ in range(n)]


def test_latency_probe_times_every_accepted_sample_in_its_own_process(anomaly: Path) -> None:
    spec = RunSpec.model_validate_json((anomaly / "slmfleet.json").read_text())
    samples = [*windows(5), {"values": [1.0, 2.0]}]  # the last one has the wrong length: refused, not timed
    job = {"spec": spec.model_dump(mode="json"), "root": str(anomaly), "samples": samples, "threads": 1}
    report = run_probe("latency", job, timeout=300)
    assert len(report["times_ms"]) == 5
    assert all(t > 0 for t in report["times_ms"])
    # the probe's own peak, not this process's (which holds the test suite): a fresh interpreter and one model
    assert report["peak_rss_bytes"] > 10 * 2**20


def test_probe_failures_are_conversion_errors(anomaly: Path, tmp_path: Path) -> None:
    spec = RunSpec.model_validate_json((anomaly / "slmfleet.json").read_text())
    job = {"spec": spec.model_dump(mode="json"), "root": str(tmp_path), "samples": windows(1), "threads": 1}
    with pytest.raises(ConversionError, match="measuring"):
        run_probe("latency", job, timeout=300)
    with pytest.raises(ConversionError, match="not a generation bundle"):
        run_probe("generation", {**job, "root": str(anomaly), "records": []}, timeout=300)


def test_probe_usage(tmp_path: Path) -> None:
    job = tmp_path / "job.json"
    job.write_text(json.dumps({}))
    done = subprocess.run(
        [sys.executable, "-m", "agent.inference.probe", "nonsense", str(job)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "usage: python -m agent.inference.probe {latency,generation,ratio} JOB.json" in done.stderr
