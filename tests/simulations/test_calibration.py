"""Calibration of virtual devices (issue 21): measured latency and memory per variant, recorded profiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from simulations.device.behaviour import ModelBehaviour, Serving, rss_of
from simulations.errors import ScenarioError
from simulations.plan import spread
from simulations.populations import load_profile, wave_durations, write_profile
from simulations.scenario import bundled, load_scenario


def test_measured_latency_per_variant_replaces_the_assumed_one_and_scales_with_cpu_speed() -> None:
    b = ModelBehaviour(latency_ms=9.0, variant_latency={"int8": 0.6}, variant_ms={"int8": 1.5})
    assert b.median_ms("int8", cpu_speed=1.0) == pytest.approx(1.5)
    assert b.median_ms("int8", cpu_speed=0.3) == pytest.approx(5.0)
    assert b.median_ms("fp32", cpu_speed=1.0) == pytest.approx(9.0)  # not measured: assumed


def test_measured_rss_per_variant_replaces_the_manifest_estimate() -> None:
    rng = np.random.default_rng(0)
    serving = Serving("classifier", 2, "int8", "a1", manifest_rss=50 << 20)
    measured = ModelBehaviour(rss_factor=3.0, variant_rss={"int8": 100 << 20})
    assert abs(rss_of(serving, measured, rng) - (100 << 20)) < (5 << 20)
    assumed = ModelBehaviour(rss_factor=3.0)
    assert abs(rss_of(serving, assumed, rng) - (150 << 20)) < (5 << 20)


def test_a_recorded_profile_round_trips(tmp_path: Path) -> None:
    entries = [
        {"model": "classifier", "version": "v2", "variant": "int8", "latency_ms_p50": 1.2, "rss_bytes": 108_000_000}
    ]
    path = tmp_path / "sub" / "profile.yaml"
    write_profile(path, entries, {"scenario": "happy-path"})
    assert load_profile(path)[("classifier", "v2", "int8")]["latency_ms_p50"] == 1.2
    (tmp_path / "bad.yaml").write_text("variants: 3\n")
    with pytest.raises(ScenarioError, match="recorded profile"):
        load_profile(tmp_path / "bad.yaml")


def test_scenario_calibration_keys_are_checked(tmp_path: Path) -> None:
    data = yaml.safe_load(bundled("happy-path").read_text())
    data["calibration"] = {"latency": "measured", "download": "measured"}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ScenarioError, match="needs calibration.profile"):
        load_scenario(path)
    write_profile(tmp_path / "p.yaml", [], {})
    data["calibration"]["profile"] = "p.yaml"  # relative to the scenario file
    path.write_text(yaml.safe_dump(data))
    assert load_scenario(path).calibration.profile == (tmp_path / "p.yaml").resolve()
    data["calibration"]["latency"] = "guessed"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ScenarioError, match="latency"):
        load_scenario(path)
    with pytest.raises(ScenarioError, match="real_agents"):
        load_scenario(bundled("happy-path"), devices=4, overrides={"fleet.real_agents": 5})


def test_real_agents_spread_over_the_profiles() -> None:
    assert spread(10, 0) == []
    assert spread(10, 5) == [0, 2, 4, 6, 8]
    assert spread(3, 5) == [0, 1, 2]


def test_wave_durations_come_from_the_rollout_transitions() -> None:
    rollout = {
        "waves": [{}, {}, {}],
        "transitions": [
            {"at": "2026-01-01T00:00:00Z", "to_state": "deploying", "wave": 0},
            {"at": "2026-01-01T00:00:10Z", "to_state": "baking", "wave": 0},
            {"at": "2026-01-01T00:00:12Z", "to_state": "deploying", "wave": 1},
            {"at": "2026-01-01T00:00:30Z", "to_state": "aborting", "wave": 1},
            {"at": "2026-01-01T00:00:31Z", "to_state": "aborted", "wave": 1},
        ],
    }
    assert wave_durations(rollout) == [12.0, 19.0, None]
