"""Agent settings: a TOML file (``--config``) with command-line overrides.

Secrets (the broker password) never come from the command line: they are read
from a file with mode 0600 or from systemd's credentials directory.
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.protocol import topics
from agent.protocol.messages import Labels


class ConfigError(Exception):
    """The agent's configuration is wrong; the message says what to fix."""


class AgentSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    device_id: str = Field(description="this device's id; it appears in every topic")
    broker: str = Field("mqtt://127.0.0.1:1883", description="broker URL, mqtt://host:port or mqtts://host:port")
    data_dir: Path = Field(Path("/var/lib/slmfleet-agent"), description="state: spool, model slots, identity")
    model: Path | None = Field(None, description="an ONNX model to serve from the start")
    input: str | None = Field(None, description="JSON-lines input: a file path, or '-' for stdin")
    results: Path | None = Field(None, description="append inference results here as JSON lines")
    telemetry_interval_s: Annotated[float, Field(ge=0.1, le=86400)] = 10.0
    keepalive_s: Annotated[int, Field(ge=2, le=65535)] = 30
    reconnect_max_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    mqtt_protocol: Literal["auto", "5", "3.1.1"] = "auto"
    mqtt_username: str | None = None
    mqtt_password_file: Path | None = Field(None, description="file (mode 0600) holding the broker password")
    ca_file: Path | None = Field(None, description="CA bundle to verify the broker's TLS certificate")
    labels: Labels = Field(default_factory=dict, description="labels the device reports on first contact")
    threads: Annotated[int, Field(ge=0, le=256)] = 0
    queue_size: Annotated[int, Field(ge=1, le=1_000_000)] = 256
    spool_max_messages: Annotated[int, Field(ge=1)] = 10_000
    spool_max_bytes: Annotated[int, Field(ge=1024)] = 16 * 1024 * 1024
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, v: str) -> str:
        return topics.check_id(v)

    def mqtt_password(self) -> str | None:
        """The broker password from ``$CREDENTIALS_DIRECTORY/mqtt-password`` or ``mqtt_password_file``."""
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if cred_dir and (Path(cred_dir) / "mqtt-password").is_file():
            return (Path(cred_dir) / "mqtt-password").read_text().strip()
        if self.mqtt_password_file is None:
            return None
        path = self.mqtt_password_file
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            raise ConfigError(f"cannot read the broker password file {path}: {exc}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"{path} is readable by others; run: chmod 600 {path}")
        return path.read_text().strip()


def load_settings(config_file: Path | None, overrides: dict[str, Any]) -> AgentSettings:
    """Settings from ``config_file`` (TOML) with ``overrides`` (non-None values) on top."""
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            values = tomllib.loads(config_file.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read {config_file}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_file} is not valid TOML: {exc}") from None
        values = values.get("agent", values)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return AgentSettings(**values)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("invalid agent settings:\n" + "\n".join(lines)) from None
