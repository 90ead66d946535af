"""Controller settings: defaults, then a TOML file, then ``SLMFLEET_*`` environment variables, then flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from cryptography.fernet import Fernet
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from controller.errors import SettingsError


class ControllerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLMFLEET_", extra="forbid", validate_default=True)

    environment: Literal["development", "production"] = Field(
        "development", description="production refuses unsafe defaults (embedded broker on other hosts, open reads)"
    )
    data_dir: Path = Field(Path(".slmfleet"), description="where the database, artifacts, keys and tokens live")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL; default sqlite:///<data_dir>/controller.db (PostgreSQL: postgresql+psycopg://...)",
    )
    artifact_store: str = Field(
        "local",
        description="where model files live: local (<data_dir>/registry/store, one controller); database (rows of"
        " database_url, which every replica reaches: use it with several replicas); or the absolute path of a"
        " directory every replica mounts. Not local: the signing key (and the controller's own device CA) are"
        " shared through the database too",
    )
    shared_secrets_key: str | None = Field(
        None,
        description="a Fernet key, the same on every replica, that encrypts the secrets replicas share in the"
        " database (signing key, device CA) when artifact_store is not local; unset: stored unencrypted",
    )
    broker_url: str | None = Field(
        None,
        description="existing broker, mqtt://host:port; the nodes of a cluster: comma-separated (tried in turn);"
        " unset: start an embedded broker",
    )
    embedded_broker: Literal["auto", "mosquitto", "amqtt"] = Field(
        "auto", description="embedded broker engine: mosquitto when its binary is found (auto), else amqtt"
    )
    broker_ca_file: Path | None = Field(
        None,
        description="CA bundle that verifies the broker's certificate with mqtts:// (unset: the system's trusted"
        " CAs); the certificate and its host name are always checked",
    )
    embedded_broker_host: str = Field("127.0.0.1", description="address the embedded broker listens on")
    embedded_broker_tls_cert_file: Path | None = Field(
        None, description="PEM certificate (chain) of the embedded mosquitto: it then listens with TLS (mqtts://)"
    )
    embedded_broker_tls_key_file: Path | None = Field(
        None, description="PEM private key of embedded_broker_tls_cert_file"
    )
    embedded_broker_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        1884, description="port of the embedded broker (0: any free port)"
    )
    http_host: str = Field("127.0.0.1", description="address the REST API listens on")
    http_port: Annotated[int, Field(ge=0, le=65535)] = Field(8080, description="port of the REST API")
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate (chain) of the REST API: with tls_key_file, it is served over HTTPS"
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    tls_ca_file: Path | None = Field(
        None,
        description="CA bundle that signed tls_cert_file, written to controller.json so the CLI on this machine"
        " verifies the API with it",
    )
    replica: bool = Field(
        False,
        description="run as one of several controller replicas on one PostgreSQL database (database_url) and an"
        " external broker (broker_url): each rollout, deployment and periodic job is driven by the replica holding"
        " its lease; no embedded broker is started",
    )
    replica_id: str | None = Field(
        None, description="this replica's name in leases, the audit log and /api/v1/cluster (default: host-pid)"
    )
    lease_ttl_s: Annotated[float, Field(ge=1, le=600)] = Field(
        6.0,
        description="how long a replica's lease outlives its last renewal (renewed every third of it): a dead"
        " replica's work is taken over within about this long",
    )
    mqtt_client_id: str = Field("slmfleet-controller", description="client id of the controller's MQTT session")
    mqtt_username: str | None = Field(None, description="controller's broker user")
    mqtt_password: str | None = Field(None, description="controller's broker password")
    broker_auth: Literal["none", "dynsec"] = Field(
        "none",
        description="none: the broker decides who connects (the embedded one lets anyone on loopback in);"
        " dynsec: the controller administers mosquitto's dynamic security plugin, each enrolled device gets its"
        " own broker credentials and may only use its own topics, anonymous clients are refused",
    )
    broker_artifact_acl: Literal["deployed", "fleet"] = Field(
        "deployed",
        description="with broker_auth dynsec: deployed: a device may read only the chunk broadcasts of artifacts"
        " deployed to it (one plugin change per device and artifact); fleet: any enrolled device may read any"
        " artifact broadcast (no change per deployment: for very large fleets)",
    )
    device_certificates: bool = Field(
        False,
        description="devices authenticate to the broker with a client certificate issued at enrollment and renewed"
        " before it expires (mutual TLS); revoked ones are listed in a CRL the broker reloads. The embedded"
        " mosquitto then requires one on its device listener",
    )
    device_ca_cert_file: Path | None = Field(
        None,
        description="the CA that issues device certificates (with device_ca_key_file); unset: the controller's own",
    )
    device_ca_key_file: Path | None = Field(None, description="private key of device_ca_cert_file")
    device_cert_hours: Annotated[float, Field(ge=0.01, le=24 * 3650)] = Field(
        24 * 90.0, description="lifetime of a device certificate; agents renew when a third of it is left"
    )
    device_crl_file: Path | None = Field(
        None,
        description="where the CRL of revoked device certificates is written (default <data_dir>/pki/devices.crl.pem);"
        " point your broker's crlfile at it",
    )
    broker_reload_command: str | None = Field(
        None,
        description="run after the CRL changed, for a broker the controller did not start (e.g. 'systemctl reload"
        " mosquitto'); the embedded one gets SIGHUP",
    )
    device_broker_url: str | None = Field(
        None,
        description="broker URL handed to devices at enrollment (unset: broker_url, which may be a loopback"
        " address only this machine can reach)",
    )
    enrollment_token_hours: Annotated[float, Field(gt=0, le=24 * 365)] = Field(
        24.0, description="default lifetime of an enrollment token"
    )
    public_url: str | None = Field(
        None,
        description="URL devices and operators reach the controller at (e.g. behind a reverse proxy), used in the"
        " enrollment command the API, the CLI and the dashboard show (unset: the address the request came to)",
    )
    mqtt_keepalive_s: Annotated[int, Field(ge=2, le=3600)] = Field(30, description="MQTT keepalive")
    mqtt_protocol: Literal["auto", "5", "3.1.1"] = Field("auto", description="MQTT protocol version")
    mqtt_shared_group: str | None = Field(
        None, description="MQTT 5 shared-subscription group, so several controllers split device traffic"
    )
    ingest: Literal["mqtt", "nats"] = Field(
        "mqtt",
        description="how device traffic comes in: mqtt (the broker_url connection), or nats (NATS's own protocol at"
        " nats_url, telemetry and events shared by the replicas in nats_queue_group; commands still go over MQTT)",
    )
    nats_url: str | None = Field(
        None, description="NATS servers for ingest = nats, nats://host:4222, comma-separated (the cluster's nodes)"
    )
    nats_queue_group: str = Field(
        "slmfleet-ingest", description="NATS queue group: the replicas in it share telemetry and events"
    )
    unknown_hold_s: Annotated[float, Field(ge=0, le=60)] | None = Field(
        None,
        description="seconds telemetry and events of a device whose birth has not arrived yet are held for it"
        " (then handled after the birth, or dropped as unknown_device); unset: 5 where births and telemetry"
        " come on different subscriptions that may be handled out of order (ingest = nats, or"
        " mqtt_shared_group), 0 (dropped at once) otherwise",
    )
    nats_user: str | None = Field(None, description="user on the NATS servers (ingest = nats)")
    nats_password: str | None = Field(None, description="password on the NATS servers (ingest = nats)")
    max_control_payload: Annotated[int, Field(ge=1024, le=16 * 1024 * 1024)] = Field(
        64 * 1024, description="largest state/telemetry/event payload accepted, bytes"
    )
    telemetry_rate_per_s: Annotated[float, Field(gt=0, le=100_000)] = Field(
        50.0,
        description="telemetry messages a second each device may send on average (devices send one every"
        " telemetry_interval_s, 10 s by default); beyond it and its burst they are dropped and counted in"
        " slmfleet_telemetry_throttled_total",
    )
    telemetry_burst: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        1000,
        description="telemetry messages a device may send at once above its rate: keep it above what a device"
        " flushes from its offline spool after an outage",
    )
    control_rate_per_s: Annotated[float, Field(gt=0, le=100_000)] = Field(
        20.0,
        description="state (birth, will) and event messages a second each device may send on average; beyond it"
        " and control_burst they are dropped and counted in slmfleet_control_throttled_total",
    )
    control_burst: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        1000, description="state and event messages a device may send at once above control_rate_per_s"
    )
    api_rate_per_s: Annotated[float, Field(ge=0, le=100_000)] = Field(
        100.0,
        description="REST API requests a second each source address, and each API token, may make on average"
        " (0: no limit); beyond it and api_burst they are answered 429 with Retry-After and counted in"
        " slmfleet_api_throttled_total",
    )
    api_burst: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        1000, description="REST API requests a source address or a token may make at once above api_rate_per_s"
    )
    enroll_rate_per_s: Annotated[float, Field(ge=0, le=100_000)] = Field(
        10.0,
        description="enrollment attempts (POST /api/v1/enroll) a second each source address, and each enrollment"
        " token, may make on average (0: no limit), on top of api_rate_per_s",
    )
    enroll_burst: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        200,
        description="enrollment attempts a source address may make at once above enroll_rate_per_s (a site that"
        " enrolls a batch of devices from behind one address)",
    )
    ingest_batch_size: Annotated[int, Field(ge=1, le=100_000)] = Field(
        2000, description="most rows written in one database transaction"
    )
    ingest_flush_interval_s: Annotated[float, Field(gt=0, le=60)] = Field(
        0.2, description="longest a received message waits before it is written"
    )
    ingest_queue_max: Annotated[int, Field(ge=100)] = Field(
        200_000, description="received messages waiting for the database; beyond it new ones are dropped and counted"
    )
    offline_after_factor: Annotated[float, Field(ge=1.5, le=100)] = Field(
        3.0,
        description="a device silent for this many times max(keepalive, telemetry interval) is marked offline"
        " even if the broker never delivered its will",
    )
    max_clock_skew_s: Annotated[float, Field(ge=1, le=86400)] = Field(
        300.0,
        description="a device timestamp further ahead of the controller's clock than this (or older than the"
        " telemetry retention) is flagged (slmfleet_clock_skew_total) and the receive time is stored instead",
    )
    sweep_interval_s: Annotated[float, Field(gt=0, le=3600)] = Field(5.0, description="how often lapses are checked")
    telemetry_retention_days: Annotated[float, Field(gt=0)] = Field(
        30.0, description="telemetry rows older than this are deleted by a daily job"
    )
    upload_max_bytes: Annotated[int, Field(ge=1024)] = Field(
        4 * 1024**3, description="largest model upload accepted, bytes (413 beyond)"
    )
    unpack_max_bytes: Annotated[int, Field(ge=1024)] = Field(
        8 * 1024**3, description="largest size an uploaded archive may unpack to, bytes"
    )
    chunk_size: Annotated[int, Field(ge=4096, le=64 * 1024 * 1024)] = Field(
        256 * 1024, description="delivery chunk size of new artifacts, bytes"
    )
    command_ttl_s: Annotated[float, Field(ge=60, le=7 * 86400)] = Field(
        3600.0,
        description="how long a command signed for a device stays valid (devices refuse it later, and refuse a"
        " replay before); device clocks must be within this of the controller's",
    )
    manifest_validity_days: Annotated[float, Field(gt=0)] = Field(
        365.0, description="manifests expire this long after registration (devices refuse expired ones)"
    )
    import_wait_s: Annotated[float, Field(ge=0, le=3600)] = Field(
        120.0, description="how long an upload request waits for its import before answering 202 with a job"
    )
    jobs_memory_mb: Annotated[int, Field(ge=0)] = Field(
        8192,
        description="address-space limit of a derive job's worker process (distill, prune, finetune), MiB; 0: none",
    )
    jobs_threads: Annotated[int, Field(ge=1, le=256)] = Field(
        1, description="threads (and CPUs it is pinned to, where allowed) of a derive job's worker"
    )
    jobs_nice: Annotated[int, Field(ge=0, le=19)] = Field(10, description="nice value of a derive job's worker")
    jobs_concurrency: Annotated[int, Field(ge=1, le=64)] = Field(
        1, description="derive jobs this controller runs at once (the others wait, queued)"
    )
    min_agreement: dict[str, float] = Field(
        default_factory=dict,
        description="agreement floors overriding the defaults, keyed by kind (cosine, top1, score-correlation,"
        " token, exact) or kind:variant (e.g. token:int4); see the README's Agreement floors",
    )
    rollout_step_s: Annotated[float, Field(gt=0, le=60)] = Field(
        1.0, description="how often running rollouts are advanced (device failures also advance them at once)"
    )
    health_interval_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        10.0,
        description="how often new telemetry is summed into the fleet health buckets (per model version, per"
        " minute and per hour) that the dashboard's Health pages chart",
    )
    notify_offline_after_s: Annotated[float, Field(ge=0, le=30 * 86400)] = Field(
        600.0,
        description="webhooks get a device.offline event for devices offline longer than this (once per outage),"
        " and device.online when they are back; 0 turns it off",
    )
    webhook_timeout_s: Annotated[float, Field(gt=0, le=300)] = Field(
        10.0, description="how long a webhook receiver has to answer before the attempt counts as failed"
    )
    webhook_max_attempts: Annotated[int, Field(ge=1, le=100)] = Field(
        10, description="attempts per webhook delivery before it is marked failed"
    )
    webhook_retry_base_s: Annotated[float, Field(gt=0, le=86400)] = Field(
        10.0, description="delay before the first retry of a webhook delivery; each next one waits 4x longer"
    )
    webhook_retry_max_s: Annotated[float, Field(gt=0, le=7 * 86400)] = Field(
        3600.0, description="longest delay between two attempts of a webhook delivery"
    )
    webhook_concurrency: Annotated[int, Field(ge=1, le=64)] = Field(
        4, description="webhook requests in flight at once (never more than one per webhook)"
    )
    webhook_log_days: Annotated[float, Field(gt=0)] = Field(
        30.0, description="delivered and failed webhook deliveries are kept this long in the delivery log"
    )
    require_auth_for_reads: bool = Field(False, description="require a viewer token for GET requests too")
    dashboard_session_hours: Annotated[float, Field(gt=0, le=24 * 30)] = Field(
        12.0, description="how long a dashboard login lasts before the user must log in again"
    )
    dashboard_secure_cookie: bool | None = Field(
        None,
        description="true: mark the dashboard's cookies Secure (sent over HTTPS only) always; they are Secure"
        " anyway whenever TLS is on: tls_cert_file set, an https public_url, or a request that came over HTTPS"
        " (behind a proxy, uvicorn reads X-Forwarded-Proto from 127.0.0.1)",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, v: Path) -> Path:
        """Absolute from the start: subprocesses (model evaluation) and later chdirs see the same place."""
        return v.expanduser().absolute()

    @field_validator("artifact_store")
    @classmethod
    def _artifact_store(cls, v: str) -> str:
        if v in ("local", "database"):
            return v
        if not Path(v).expanduser().is_absolute():
            raise ValueError(f"artifact_store is local, database or the absolute path of a shared directory, not {v!r}")
        return str(Path(v).expanduser())

    @field_validator("shared_secrets_key")
    @classmethod
    def _fernet_key(cls, v: str | None) -> str | None:
        if not v:
            return None
        try:
            Fernet(v.encode())
        except (ValueError, TypeError):
            raise ValueError(
                "shared_secrets_key must be a Fernet key (url-safe base64 of 32 bytes); make one with: python -c"
                " 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'"
            ) from None
        return v

    @property
    def effective_unknown_hold_s(self) -> float:
        """``unknown_hold_s``, or its default: held where births and telemetry may be handled out of order."""
        if self.unknown_hold_s is not None:
            return self.unknown_hold_s
        return 5.0 if self.ingest == "nats" or self.mqtt_shared_group else 0.0

    @property
    def shared_artifacts(self) -> bool:
        """Artifacts (and the secrets that sign them) live where several replicas reach them."""
        return self.artifact_store != "local"

    @field_validator("public_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is None:
            return None
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(f"public_url must be http(s)://host[:port][/path], not {v!r}")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _tls_pairs(self) -> ControllerSettings:
        for cert, key in (
            ("tls_cert_file", "tls_key_file"),
            ("embedded_broker_tls_cert_file", "embedded_broker_tls_key_file"),
            ("device_ca_cert_file", "device_ca_key_file"),
        ):
            if (getattr(self, cert) is None) != (getattr(self, key) is None):
                raise ValueError(f"{cert} and {key} go together: set both or neither")
            for name in (cert, key):
                path = getattr(self, name)
                if path is not None and not path.is_file():
                    raise ValueError(f"{name}: {path} is not a file")
        for name in ("broker_ca_file", "tls_ca_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: {path} is not a file")
        return self

    @property
    def https(self) -> bool:
        """Whether the REST API is served over HTTPS."""
        return self.tls_cert_file is not None

    @model_validator(mode="before")
    @classmethod
    def _replicas_share_artifacts(cls, data: Any) -> Any:
        """A replica serves versions another replica imported: unless told otherwise, artifacts and the signing key
        live in the database every replica reaches."""
        if isinstance(data, dict) and str(data.get("replica", "")).lower() in ("true", "1", "yes", "on"):
            data.setdefault("artifact_store", "database")
        return data

    @model_validator(mode="after")
    def _nats_ingest_is_complete(self) -> ControllerSettings:
        if self.ingest == "nats" and (self.nats_url is None or self.broker_url is None):
            raise ValueError("ingest = nats needs nats_url (NATS servers) and broker_url (their MQTT gateway)")
        return self

    @model_validator(mode="after")
    def _production_is_safe(self) -> ControllerSettings:
        if (
            self.environment == "production"
            and self.broker_url is None
            and self.embedded_broker_host
            not in (
                "127.0.0.1",
                "::1",
                "localhost",
            )
        ):
            raise ValueError(
                "production: the embedded broker allows anonymous clients; use broker_url with an authenticated broker"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'controller.db').resolve()}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        if settings_cls.model_config.get("toml_file"):
            sources += (TomlConfigSettingsSource(settings_cls),)
        return sources


def load_settings(config_file: Path | None = None, **overrides: Any) -> ControllerSettings:
    """Settings from defaults < ``config_file`` (TOML) < environment < ``overrides`` (None values ignored)."""
    cls: type[ControllerSettings] = ControllerSettings
    if config_file is not None:
        if not config_file.is_file():
            raise SettingsError(f"settings file {config_file} does not exist")
        cls = type(
            "ControllerSettingsFromFile",
            (ControllerSettings,),
            {"model_config": SettingsConfigDict(**{**ControllerSettings.model_config, "toml_file": config_file})},
        )
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()]
        raise SettingsError("invalid controller settings:\n" + "\n".join(lines)) from None
