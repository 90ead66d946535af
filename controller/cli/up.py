"""``slmfleet up``: controller, REST API and a broker on embedded defaults."""

from __future__ import annotations

import logging
import signal
import socket
from pathlib import Path
from typing import Annotated

import typer
import uvicorn
from rich.console import Console
from rich.markup import escape
from sqlmodel import Session

from controller import datadir
from controller.app import create_app
from controller.auth.tokens import ensure_admin_token
from controller.auth.users import ADMIN_PASSWORD_FILE, INITIAL_ADMIN, ensure_initial_admin
from controller.broker import dynsec
from controller.broker.embedded import EmbeddedBroker, packet_limit
from controller.cli.client import ADMIN_TOKEN_FILE, write_connection_file
from controller.datadir import DataDirLock
from controller.errors import ControllerError
from controller.pki import broker as pki_broker
from controller.registry import keys
from controller.runtime import ControllerRuntime
from controller.settings import load_settings

log = logging.getLogger(__name__)
#: seconds the REST API keeps an idle connection open (uvicorn's default is 5)
KEEP_ALIVE_S = 30


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ControllerError(
                f"cannot listen on {host}:{port} ({exc.strerror}); choose another with --port"
            ) from None


def up(
    data_dir: Annotated[Path | None, typer.Option(help="data directory [default: ./.slmfleet]")] = None,
    broker: Annotated[
        str | None, typer.Option(help="use this broker (mqtt://host:port) instead of an embedded one")
    ] = None,
    host: Annotated[str | None, typer.Option(help="REST API address [default: 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="REST API port [default: 8080]")] = None,
    broker_port: Annotated[int | None, typer.Option(help="embedded broker port [default: 1884]")] = None,
    broker_engine: Annotated[str | None, typer.Option(help="embedded broker: auto, mosquitto or amqtt")] = None,
    broker_auth: Annotated[
        str | None,
        typer.Option(
            help="none, or dynsec: per-device broker credentials and ACLs (mosquitto's dynamic security plugin);"
            " devices then join with 'slmfleet agent enroll'"
        ),
    ] = None,
    device_certificates: Annotated[
        bool | None,
        typer.Option(
            "--device-certificates",
            help="devices authenticate to the broker with client certificates issued at enrollment (mutual TLS)",
        ),
    ] = None,
    tls_cert_file: Annotated[
        Path | None, typer.Option(help="serve the REST API over HTTPS with this PEM certificate (with --tls-key-file)")
    ] = None,
    tls_key_file: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert-file")] = None,
    replica: Annotated[
        bool | None,
        typer.Option(
            "--replica",
            help="join other controllers on one database (--database-url, PostgreSQL) and broker (--broker, required):"
            " rollouts, deployments and periodic jobs are driven by whichever replica holds their lease",
        ),
    ] = None,
    replica_id: Annotated[str | None, typer.Option(help="this replica's name [default: host-pid]")] = None,
    database_url: Annotated[
        str | None, typer.Option(help="database URL (e.g. postgresql+psycopg://...) [default: SQLite in the data dir]")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="TOML settings file")] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING or ERROR")] = None,
) -> None:
    """Run the controller, its REST API and (unless --broker) an embedded MQTT broker."""
    console = Console(stderr=True)
    try:
        settings = load_settings(
            config,
            data_dir=data_dir,
            broker_url=broker,
            http_host=host,
            http_port=port,
            embedded_broker_port=broker_port,
            embedded_broker=broker_engine,
            broker_auth=broker_auth,
            device_certificates=device_certificates,
            tls_cert_file=tls_cert_file,
            tls_key_file=tls_key_file,
            log_level=log_level,
            replica=replica,
            replica_id=replica_id,
            database_url=database_url,
        )
        if settings.replica and settings.broker_url is None:
            raise ControllerError("--replica needs the broker every replica shares: --broker mqtt://host:port")
    except ControllerError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("apscheduler", "alembic.runtime.migration"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    data = settings.data_dir.resolve()
    embedded: EmbeddedBroker | None = None
    runtime: ControllerRuntime | None = None
    lock = DataDirLock(data)
    try:
        datadir.prepare(data)  # 0700, its files 0600 (fixed with a log line), umask 077 from here on
        lock.acquire()  # before anything else touches the directory: the database, the broker, controller.json
        _check_port_free(settings.http_host, settings.http_port)
        if settings.broker_url is None:
            dynsec_file = None
            update: dict[str, object] = {}
            if settings.broker_auth == "dynsec":
                dynsec_file, secret = dynsec.prepare(data / "broker")
                update.update(mqtt_username=dynsec.CONTROLLER_USER, mqtt_password=secret)
            certs = pki_broker.prepare_embedded(settings) if settings.device_certificates else None
            embedded = EmbeddedBroker(
                data / "broker",
                dynsec_file=dynsec_file,
                host=settings.embedded_broker_host,
                port=settings.embedded_broker_port,
                engine=settings.embedded_broker,
                tls_cert_file=settings.embedded_broker_tls_cert_file,
                tls_key_file=settings.embedded_broker_tls_key_file,
                max_packet_size=packet_limit(settings.chunk_size),
                supervise=True,
                client_certs=certs,
            )
            url = embedded.start()
            update["broker_url"] = embedded.controller_url
            if certs is not None:
                update.update(pki_broker.device_settings(url, certs, settings))
            if embedded.engine == "amqtt" and settings.mqtt_protocol == "auto":
                update["mqtt_protocol"] = "3.1.1"
            settings = settings.model_copy(update=update)
        runtime = ControllerRuntime(settings, embedded_broker=embedded)
        runtime.start()
        token_file = data / ADMIN_TOKEN_FILE
        password_file = data / ADMIN_PASSWORD_FILE
        with Session(runtime.engine) as session:
            ensure_admin_token(session, token_file)
            ensure_initial_admin(session, password_file)
        shown_host = settings.http_host if ":" not in settings.http_host else f"[{settings.http_host}]"
        scheme = "https" if settings.https else "http"
        api = f"{scheme}://{shown_host}:{settings.http_port}"
        write_connection_file(
            data,
            api,
            str(settings.broker_url),
            ca_file=str(settings.tls_ca_file.resolve()) if settings.tls_ca_file else None,
        )
        ca_hint = (
            f" --ca-file {settings.broker_ca_file.resolve()}"
            if settings.broker_ca_file is not None and str(settings.broker_url).startswith("mqtts://")
            else ""
        )
        public_key = keys.write_public(runtime.models.key, data / keys.PUBLIC_KEY_FILE)
        broker_note = f" (embedded {embedded.engine}, MQTT {embedded.protocol})" if embedded else ""
        console.print(
            "[bold green]slmfleet controller is up[/bold green]\n"
            f"  dashboard     {api}/  (user {INITIAL_ADMIN}"
            + (f", password in {password_file}, mode 0600)\n" if password_file.is_file() else ")\n")
            + f"  REST API      {api}/api/v1\n"
            f"  API docs      {api}/docs\n"
            f"  metrics       {api}/metrics\n"
            f"  MQTT broker   {settings.device_broker_url or settings.broker_url}{broker_note}\n"
            f"  database      {settings.resolved_database_url}\n"
            + (
                f"  replica       {runtime.owner.replica_id} (lease TTL {settings.lease_ttl_s:g} s;"
                f" who drives what: {api}/api/v1/cluster)\n"
                if settings.replica
                else ""
            )
            + f"  admin token   {token_file}  (mode 0600; send it as 'Authorization: Bearer <token>')\n"
            f"  signing key   {public_key}  (public; devices pin it, also GET /api/v1/signing-key)\n"
            + (
                "  connect a device:  slmfleet enrollment create  (admin token), then on the device:\n"
                f"                     slmfleet agent enroll --controller {api} --token-file TOKEN --dir ./device\n"
                "                     slmfleet agent --config ./device/agent.toml\n"
                if settings.broker_auth == "dynsec" or settings.device_certificates
                else f"  connect a device:  slmfleet agent --broker {settings.broker_url} --device-id DEVICE"
                f" --data-dir ./device-state --signing-key-file {public_key}{ca_hint}\n"
            )
            + "  stop with Ctrl-C",
            highlight=False,
            soft_wrap=True,
        )
        app = create_app(settings, runtime)
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=settings.http_host,
                port=settings.http_port,
                log_level="warning",
                access_log=False,
                lifespan="on",
                # longer than the clients' own idle expiry (httpx: 5 s), so a client never sends on a connection
                # the server is closing ("server disconnected without sending a response")
                timeout_keep_alive=KEEP_ALIVE_S,
                ssl_certfile=str(settings.tls_cert_file) if settings.tls_cert_file else None,
                ssl_keyfile=str(settings.tls_key_file) if settings.tls_key_file else None,
            )
        )
        # uvicorn re-raises the signal that stopped it once it is done; with the default handlers that
        # would kill this process before the finally below stops the runtime and the embedded broker.
        received: list[int] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, _frame: received.append(signum))
        server.run()
        console.print("slmfleet controller stopped", highlight=False)
    except ControllerError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    finally:
        if runtime is not None:
            runtime.stop()
        if embedded is not None:
            embedded.stop()
        lock.release()
