from pathlib import Path

import pytest

from controller.errors import SettingsError
from controller.settings import load_settings


def test_precedence_defaults_file_env_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('http_port = 9001\nlog_level = "DEBUG"\ntelemetry_retention_days = 7\n')
    s = load_settings(conf)
    assert (s.http_port, s.log_level, s.telemetry_retention_days, s.ingest_batch_size) == (9001, "DEBUG", 7, 2000)
    monkeypatch.setenv("SLMFLEET_HTTP_PORT", "9002")
    assert load_settings(conf).http_port == 9002
    assert load_settings(conf, http_port=9003).http_port == 9003


def test_unknown_and_invalid_settings_are_refused_with_their_name(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("http_prot = 1\n")
    with pytest.raises(SettingsError, match="http_prot"):
        load_settings(conf)
    with pytest.raises(SettingsError, match="http_port"):
        load_settings(http_port=70000)
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


def test_production_refuses_an_exposed_anonymous_broker() -> None:
    with pytest.raises(SettingsError, match="anonymous"):
        load_settings(environment="production", embedded_broker_host="0.0.0.0")
    assert load_settings(environment="production", broker_url="mqtt://broker:1883").environment == "production"


def test_default_database_lives_in_the_data_dir(tmp_path: Path) -> None:
    s = load_settings(data_dir=tmp_path / "d")
    assert s.resolved_database_url == f"sqlite:///{(tmp_path / 'd' / 'controller.db').resolve()}"


def test_a_relative_data_dir_is_made_absolute_where_the_controller_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Model evaluation runs in subprocesses with another working directory: paths must not be relative."""
    monkeypatch.chdir(tmp_path)
    s = load_settings(data_dir=Path(".slmfleet"))
    assert s.data_dir == tmp_path / ".slmfleet" and s.data_dir.is_absolute()
    assert load_settings().data_dir == tmp_path / ".slmfleet"


def test_a_replica_keeps_artifacts_where_every_replica_reaches_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """One controller keeps its files local; a replica defaults to the database store, unless told otherwise."""
    assert load_settings().artifact_store == "local"
    assert load_settings(replica=True, broker_url="mqtt://127.0.0.1:1").artifact_store == "database"
    monkeypatch.setenv("SLMFLEET_REPLICA", "true")
    assert load_settings(broker_url="mqtt://127.0.0.1:1").artifact_store == "database"
    assert load_settings(broker_url="mqtt://127.0.0.1:1", artifact_store="local").artifact_store == "local"
