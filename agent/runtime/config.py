"""Agent settings: a TOML file (``--config``) with command-line overrides.

Secrets (the broker password) never come from the command line: they are read
from a file with mode 0600 or from systemd's credentials directory.
"""

from __future__ import annotations

import ipaddress
import os
import stat
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from wire import topics
from wire.messages import Labels


class ConfigError(Exception):
    """The agent's configuration is wrong; the message says what to fix."""


class AgentSettings(BaseModel):
    """Everything the agent is told. TOML keys and ``--flags`` have these names (flags with dashes)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    device_id: str = Field(description="this device's id; it appears in every topic")
    broker: str = Field(
        "mqtt://127.0.0.1:1883",
        description="broker URL, mqtt://host:port or mqtts://host:port; several (the nodes of a cluster, tried in"
        " turn): comma-separated",
    )
    data_dir: Path = Field(Path("/var/lib/slmfleet-agent"), description="state: spool, model slots, identity")
    model: Path | None = Field(
        None,
        description="a model to serve from the start: a bare .onnx (raw tensors) or a bundle directory"
        " with manifest.json (Manifest or SignedManifest) or slmfleet.json (RunSpec)",
    )
    input: list[str] = Field(
        default_factory=list, description="JSON-lines inputs: file paths, or '-' for stdin (one string or a list)"
    )
    results: Path | None = Field(None, description="append inference results here as JSON lines")
    results_mqtt: bool = Field(False, description="publish results on slmfleet/v1/dev/{id}/results (QoS 0)")
    results_sample: Annotated[float, Field(ge=0, le=1)] = Field(
        1.0, description="fraction of results published on MQTT (the results file gets all of them)"
    )
    results_include_input: bool = Field(
        False, description="operator opt-in: put each raw input next to its result (inputs then leave the device)"
    )
    max_batch: Annotated[int, Field(ge=1, le=1024)] = Field(16, description="records per micro-batch, at most")
    max_wait_ms: Annotated[float, Field(ge=0, le=10_000)] = Field(
        5.0, description="longest a record waits for its micro-batch to fill (only where batching pays)"
    )
    http_port: Annotated[int, Field(ge=0, le=65535)] | None = Field(
        None, description="serve POST /v1/infer and GET /v1/health on this loopback port (0: any free port)"
    )
    http_host: str = Field("127.0.0.1", description="loopback address for the HTTP endpoint (never a public one)")
    http_max_body_bytes: Annotated[int, Field(ge=1024, le=256 * 1024 * 1024)] = Field(
        1024 * 1024, description="largest request body the HTTP endpoint accepts"
    )
    mqtt_input_topics: list[str] = Field(
        default_factory=list, description="topic filters whose messages are inference inputs (e.g. sensors/+/window)"
    )
    mqtt_input_broker: str | None = Field(
        None, description="broker URL of the input topics (a local gateway); unset: the fleet broker connection"
    )
    mqtt_input_username: str | None = Field(None, description="user name on the input broker")
    mqtt_input_password_file: Path | None = Field(
        None, description="file (mode 0600) with the input broker's password (or credential mqtt-input-password)"
    )
    mqtt_input_qos: Literal[0, 1] = Field(0, description="QoS of the input subscriptions")
    mqtt_input_format: Literal["json", "text"] = Field(
        "json", description="json: payloads are JSON; text: the UTF-8 payload is the text"
    )
    mqtt_input_path: str = Field("", description="dotted path to the input inside a JSON payload ('' = all of it)")
    mqtt_input_key: str | None = Field(
        None, description="wrap the extracted value as {key: value} (e.g. 'values', 'text'); unset: it is the record"
    )
    mqtt_input_id_path: str = Field("", description="dotted path to an id in the payload, echoed with the result")
    telemetry_interval_s: Annotated[float, Field(ge=0.1, le=86400)] = 10.0
    keepalive_s: Annotated[int, Field(ge=2, le=65535)] = 30
    reconnect_max_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    broker_refused_retry_s: Annotated[float, Field(ge=0, le=86400)] = Field(
        600.0,
        description="when the broker refuses the credentials (revoked, or its auth broken for a while), keep"
        " serving local inputs and try again this often; 0: give up and exit with status 3",
    )
    mqtt_protocol: Literal["auto", "5", "3.1.1"] = "auto"
    mqtt_username: str | None = None
    mqtt_password_file: Path | None = Field(None, description="file (mode 0600) holding the broker password")
    ca_file: Path | None = Field(None, description="CA bundle to verify the broker's TLS certificate")
    mqtt_cert_file: Path | None = Field(
        None,
        description="client certificate (PEM) for a broker that requires one (mutual TLS), or credential"
        " mqtt-client-cert; renewed ones are kept in data_dir/tls",
    )
    mqtt_key_file: Path | None = Field(
        None, description="its private key (PEM, mode 0600), or credential mqtt-client-key"
    )
    labels: Labels = Field(default_factory=dict, description="labels the device reports on first contact")
    report_hardware: dict[str, int | str] = Field(
        default_factory=dict,
        description="fields of the hardware profile to report instead of the measured ones (ram_bytes, arch,"
        " cpu_count, disk_free_bytes, os): a rehearsal's real agent standing in for another class of device"
        " (``slmfleet simulate --real``); the controller then picks variants as for that device",
    )
    threads: Annotated[int, Field(ge=0, le=256)] = Field(0, description="onnxruntime intra-op threads (0: automatic)")
    ort_allow_spinning: bool = Field(
        False,
        description="let onnxruntime's threads busy-wait between runs (off: the agent's other work gets the cores)",
    )
    queue_size: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        256, description="records waiting for inference, at most; beyond it MQTT and HTTP inputs are dropped"
    )
    model_max_rss_mib: Annotated[int, Field(ge=0, le=1_048_576)] = Field(
        0, description="memory ceiling for one model in MiB (0: none); a model over it is refused"
    )
    signing_key_file: Path | None = Field(
        None,
        description="the controller's Ed25519 public key (PEM) that manifests must be signed with"
        " (or credential signing-key); unset: every deployment is refused",
    )
    store_max_bytes: Annotated[int, Field(ge=0)] = Field(
        0, description="cap on the bytes the two model slots may use together (0: only the free disk space)"
    )
    spool_max_messages: Annotated[int, Field(ge=1)] = 10_000
    spool_max_bytes: Annotated[int, Field(ge=1024)] = 16 * 1024 * 1024
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("input", mode="before")
    @classmethod
    def _input_list(cls, v: Any) -> Any:
        if v is None:
            return []
        return [v] if isinstance(v, str) else v

    @field_validator("report_hardware")
    @classmethod
    def _hardware_fields(cls, v: dict[str, int | str]) -> dict[str, int | str]:
        allowed = {"ram_bytes", "arch", "cpu_count", "disk_free_bytes", "os", "cpu_model"}
        unknown = sorted(set(v) - allowed)
        if unknown:
            raise ValueError(f"unknown hardware fields {unknown} (known: {sorted(allowed)})")
        return v

    @field_validator("http_host")
    @classmethod
    def _loopback(cls, v: str) -> str:
        if v != "localhost":
            try:
                loopback = ipaddress.ip_address(v).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                raise ValueError(f"{v!r} is not a loopback address: the inference endpoint serves this device only")
        return v

    @field_validator("mqtt_input_topics")
    @classmethod
    def _topic_filters(cls, v: list[str]) -> list[str]:
        for f in v:
            parts = f.split("/")
            if not f or any(("#" in p and p != "#") or ("+" in p and p != "+") for p in parts) or "#" in parts[:-1]:
                raise ValueError(f"{f!r} is not a valid MQTT topic filter")
        return v

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, v: str) -> str:
        return topics.check_id(v)

    def mqtt_password(self) -> str | None:
        """The broker password from ``$CREDENTIALS_DIRECTORY/mqtt-password`` or ``mqtt_password_file``."""
        return _secret("mqtt-password", self.mqtt_password_file)

    def pinned_key_file(self) -> Path | None:
        """The pinned signing key: ``$CREDENTIALS_DIRECTORY/signing-key`` (systemd), else ``signing_key_file``."""
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        credential = Path(cred_dir) / "signing-key" if cred_dir else None
        if credential is not None and credential.is_file() and credential.stat().st_size > 0:
            return credential  # an empty credential is the installer's "none pinned yet"
        return self.signing_key_file

    def client_cert_files(self) -> tuple[Path, Path] | None:
        """The client certificate and key: systemd credentials ``mqtt-client-cert``/``-key`` when present and
        not empty, else ``mqtt_cert_file``/``mqtt_key_file`` (the key must be mode 0600); None: not configured."""
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if cred_dir:
            cert, key = Path(cred_dir) / "mqtt-client-cert", Path(cred_dir) / "mqtt-client-key"
            if cert.is_file() and key.is_file() and cert.stat().st_size > 0 and key.stat().st_size > 0:
                return cert, key
        if self.mqtt_cert_file is None and self.mqtt_key_file is None:
            return None
        if self.mqtt_cert_file is None or self.mqtt_key_file is None:
            raise ConfigError("mqtt_cert_file and mqtt_key_file go together: set both or neither")
        try:
            mode = self.mqtt_key_file.stat().st_mode
        except OSError as exc:
            raise ConfigError(f"cannot read the client key {self.mqtt_key_file}: {exc}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"{self.mqtt_key_file} is readable by others; run: chmod 600 {self.mqtt_key_file}")
        return self.mqtt_cert_file, self.mqtt_key_file

    def mqtt_input_password(self) -> str | None:
        """The input broker's password from credential ``mqtt-input-password`` or ``mqtt_input_password_file``."""
        return _secret("mqtt-input-password", self.mqtt_input_password_file)


def _secret(credential: str, file: Path | None) -> str | None:
    """A secret from systemd's credentials directory, else from ``file`` (which must be mode 0600)."""
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / credential).is_file():
        return (Path(cred_dir) / credential).read_text().strip()
    if file is None:
        return None
    path = file
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"cannot read the password file {path}: {exc}") from None
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
