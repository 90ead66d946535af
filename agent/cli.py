"""The device agent's command line: ``slmfleet agent ...`` (through ``slmfleet.cli``) or ``slmfleet-agent ...``.

Needs only the ``agent`` extra (argparse, no CLI framework) and imports nothing from the controller.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from agent import __version__


def _agent_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slmfleet agent",
        description="Run the slmfleet device agent. Settings come from --config (TOML) and these flags."
        " 'slmfleet agent enroll --help': join a fleet with an enrollment token.",
    )
    p.add_argument("--config", type=Path, help="TOML settings file (flags override it)")
    p.add_argument(
        "--broker",
        action="append",
        help="broker URL, e.g. mqtt://127.0.0.1:1883; the nodes of a cluster: repeat it, or a comma-separated list"
        " (tried in turn: when one node dies the agent moves to the next)",
    )
    p.add_argument("--device-id", dest="device_id", help="this device's id")
    p.add_argument("--data-dir", dest="data_dir", type=Path, help="state directory (spool, models)")
    p.add_argument(
        "--model",
        type=Path,
        help="model to serve: a bundle directory (manifest.json or slmfleet.json) or a bare .onnx (raw tensors)",
    )
    p.add_argument(
        "--input",
        action="append",
        default=None,
        metavar="PATH",
        help="JSON-lines input file, or - for stdin (repeatable)",
    )
    p.add_argument("--results", type=Path, help="append results to this JSON-lines file")
    p.add_argument(
        "--results-mqtt", dest="results_mqtt", action="store_true", default=None, help="publish results on MQTT"
    )
    p.add_argument("--results-sample", dest="results_sample", type=float, help="fraction of results sent on MQTT")
    p.add_argument(
        "--results-include-input",
        dest="results_include_input",
        action="store_true",
        default=None,
        help="put raw inputs next to results (they then leave the device)",
    )
    p.add_argument("--max-batch", dest="max_batch", type=int, help="records per micro-batch (default 16)")
    p.add_argument("--max-wait-ms", dest="max_wait_ms", type=float, help="max added latency to fill a batch (5)")
    p.add_argument("--queue-size", dest="queue_size", type=int, help="bounded input queue (default 256)")
    p.add_argument("--http-port", dest="http_port", type=int, help="serve /v1/infer on this loopback port")
    p.add_argument("--mqtt-input-topic", dest="mqtt_input_topics", action="append", default=None, metavar="FILTER")
    p.add_argument("--mqtt-input-broker", dest="mqtt_input_broker", help="broker of the input topics (default: fleet)")
    p.add_argument("--mqtt-input-format", dest="mqtt_input_format", choices=["json", "text"])
    p.add_argument("--mqtt-input-path", dest="mqtt_input_path", help="dotted path of the input in a JSON payload")
    p.add_argument("--mqtt-input-key", dest="mqtt_input_key", help="wrap the input as {KEY: value}")
    p.add_argument("--mqtt-input-id-path", dest="mqtt_input_id_path", help="dotted path of an id in the payload")
    p.add_argument(
        "--model-max-rss-mib", dest="model_max_rss_mib", type=int, help="refuse models that need more memory"
    )
    p.add_argument("--telemetry-interval", dest="telemetry_interval_s", type=float, help="seconds (default 10)")
    p.add_argument("--keepalive", dest="keepalive_s", type=int, help="MQTT keepalive in seconds (default 30)")
    p.add_argument("--reconnect-max", dest="reconnect_max_s", type=float, help="max reconnect backoff, seconds")
    p.add_argument(
        "--broker-refused-retry",
        dest="broker_refused_retry_s",
        type=float,
        help="seconds between tries once the broker refused the credentials (default 600; 0: exit with status 3)",
    )
    p.add_argument("--mqtt-protocol", dest="mqtt_protocol", choices=["auto", "5", "3.1.1"])
    p.add_argument("--mqtt-username", dest="mqtt_username")
    p.add_argument("--mqtt-password-file", dest="mqtt_password_file", type=Path)
    p.add_argument("--ca-file", dest="ca_file", type=Path)
    p.add_argument("--mqtt-cert-file", dest="mqtt_cert_file", type=Path, help="client certificate (mutual TLS)")
    p.add_argument("--mqtt-key-file", dest="mqtt_key_file", type=Path, help="its private key (mode 0600)")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="a label (repeatable)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (0: automatic)")
    p.add_argument(
        "--ort-allow-spinning",
        dest="ort_allow_spinning",
        action="store_true",
        default=None,
        help="let onnxruntime's threads busy-wait between runs (off by default)",
    )
    p.add_argument(
        "--signing-key-file",
        dest="signing_key_file",
        type=Path,
        help="the controller's public key (PEM, GET /api/v1/signing-key); without it deployments are refused",
    )
    p.add_argument("--store-max-bytes", dest="store_max_bytes", type=int, help="cap on the two model slots (0: none)")
    p.add_argument("--log-level", dest="log_level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def agent_main(argv: list[str]) -> int:
    if argv and argv[0] == "enroll":
        from agent.runtime.enroll import enroll_main

        return enroll_main(argv[1:])
    from agent.runtime.config import ConfigError, load_settings

    args = _agent_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "label")}
    if args.broker:
        overrides["broker"] = ",".join(args.broker)
    if args.label:
        labels: dict[str, str] = {}
        for item in args.label:
            key, sep, value = item.partition("=")
            if not sep:
                print(f"error: --label {item!r}: use KEY=VALUE", file=sys.stderr)  # noqa: T201
                return 2
            labels[key] = value
        overrides["labels"] = labels
    try:
        settings = load_settings(args.config, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    from agent.runtime.service import run_agent

    try:
        return run_agent(settings)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 2


def main(argv: list[str] | None = None) -> int:
    """``slmfleet-agent [enroll] ...`` (also ``python -m agent.cli [agent] ...``): the device agent alone."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "agent":
        argv = argv[1:]
    if argv and argv[0] in ("--version", "version"):
        print(f"slmfleet-agent {__version__}")  # noqa: T201
        return 0
    return agent_main(argv)


if __name__ == "__main__":
    sys.exit(main())
