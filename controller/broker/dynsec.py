"""Per-device broker credentials and ACLs with mosquitto's dynamic security plugin.

The plugin keeps clients, roles and ACLs in a JSON file and is managed at
run time by publishing JSON commands on ``$CONTROL/dynamic-security/v1``
(answers come on ``.../response``). slmfleet uses it like this:

- the controller is the plugin's administrator (client ``slmfleet-controller``,
  role ``slmfleet-controller``: the whole ``slmfleet/v1/#`` tree and the
  control topic);
- every enrolled device is a client whose user name and client id are its
  device id, with a role of its own (``slmfleet-dev-{id}``) listing literal
  topics: it may publish its state, telemetry, events and results, and
  subscribe to its commands and repaired chunks. mosquitto 2.0's plugin does
  not substitute ``%u``/``%c`` in ACLs, hence one role per device;
- deploying an artifact to a device adds a subscribe ACL for that artifact's
  chunk topic to the device's role (adding an ACL does not disconnect the
  client; changing a client's roles would). With ``broker_artifact_acl =
  "fleet"`` instead, the role every device shares (``slmfleet-devices``) lets
  any enrolled device read any artifact broadcast: no change per deployment,
  which matters because the plugin rewrites its whole file on every change;
- revoking a device deletes its client and role: the broker disconnects it at
  once and refuses it from then on;
- the default ACL access refuses every publish and subscribe not granted, and
  ``allow_anonymous false`` refuses clients without credentials.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.auth.tokens import write_secret_file
from controller.errors import BrokerError
from wire import topics
from wire.topics import DeviceChannel

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
CONTROLLER_USER = "slmfleet-controller"
CONTROLLER_ROLE = "slmfleet-controller"
DEVICE_ROLE_PREFIX = "slmfleet-dev-"
#: the role every device has besides its own (fleet-wide grants)
SHARED_DEVICE_ROLE = "slmfleet-devices"
ALL_ARTIFACTS = f"{topics.ARTIFACT_PREFIX}/+/chunks"
#: mosquitto_ctrl's default; the hash is PBKDF2-HMAC-SHA512 over the password and a 12-byte salt
ITERATIONS = 101
PLUGIN_NAME = "mosquitto_dynamic_security.so"
_PLUGIN_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib/arm-linux-gnueabihf",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
    "/opt/homebrew/lib",
)

#: what a device may publish (its own subtree, never cmd or chunks)
DEVICE_PUBLISH = (DeviceChannel.STATE, DeviceChannel.TELEMETRY, DeviceChannel.EVENTS, DeviceChannel.RESULTS)
#: what a device may subscribe to (its commands and the chunks repaired for it alone)
DEVICE_SUBSCRIBE = (DeviceChannel.CMD, DeviceChannel.CHUNKS)


class DynsecError(Exception):
    """The broker refused a dynamic-security command, or did not answer."""


def plugin_path() -> Path | None:
    """Where mosquitto's dynamic security plugin is installed, or None."""
    override = os.environ.get("SLMFLEET_DYNSEC_PLUGIN")
    if override:
        return Path(override) if Path(override).is_file() else None
    for directory in _PLUGIN_DIRS:
        for candidate in (Path(directory) / PLUGIN_NAME, Path(directory) / "mosquitto" / PLUGIN_NAME):
            if candidate.is_file():
                return candidate
    return None


def hash_password(password: str, salt: bytes | None = None, iterations: int = ITERATIONS) -> dict[str, Any]:
    """The plugin's stored form of a password (what ``mosquitto_ctrl dynsec init`` writes)."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": iterations,
    }


def _acl(acltype: str, topic: str, allow: bool = True) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "priority": 0, "allow": allow}


def controller_acls() -> list[dict[str, Any]]:
    """The controller's role: the whole slmfleet tree and the plugin's control topic."""
    acls = []
    for tree in (f"{topics.ROOT}/#", f"{CONTROL_TOPIC}/#", CONTROL_TOPIC):
        acls += [_acl("publishClientSend", tree), _acl("publishClientReceive", tree), _acl("subscribePattern", tree)]
    return acls + [_acl("unsubscribePattern", "#")]


def device_role(device_id: str) -> str:
    return DEVICE_ROLE_PREFIX + topics.check_id(device_id)


def device_acls(device_id: str) -> list[dict[str, Any]]:
    """A device's own topics, literally (no wildcards: a device id never contains + or #)."""
    acls = [_acl("publishClientSend", topics.device(device_id, ch)) for ch in DEVICE_PUBLISH]
    acls += [_acl("subscribeLiteral", topics.device(device_id, ch)) for ch in DEVICE_SUBSCRIBE]
    return acls


def artifact_acl(artifact_id: str) -> dict[str, Any]:
    return _acl("subscribeLiteral", topics.artifact_chunks(artifact_id))


def initial_config(controller_password: str, controller_user: str = CONTROLLER_USER) -> dict[str, Any]:
    """A fresh plugin configuration: the controller as administrator, everything else refused."""
    return {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": True,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": [
            {
                "username": controller_user,
                "textName": "slmfleet controller",
                **hash_password(controller_password),
                "roles": [{"rolename": CONTROLLER_ROLE}],
            }
        ],
        "groups": [],
        "roles": [{"rolename": CONTROLLER_ROLE, "acls": controller_acls()}],
    }


def write_initial_config(path: Path, controller_password: str, controller_user: str = CONTROLLER_USER) -> None:
    """Write a fresh plugin configuration (mode 0600: it holds password hashes)."""
    write_secret_file(path, json.dumps(initial_config(controller_password, controller_user), indent=2))


def read_or_create_secret(path: Path) -> str:
    """A random secret kept in ``path`` (mode 0600), created on first use."""
    if path.is_file():
        return path.read_text().strip()
    secret = secrets.token_urlsafe(32)
    write_secret_file(path, secret)
    return secret


Publish = Callable[[str, bytes], object]


@dataclass
class _Waiter:
    expected: int
    answers: list[dict[str, Any]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)


class DynsecAdmin:
    """Sends dynamic-security commands over the controller's MQTT connection.

    ``publish`` sends on that connection; feed every message on
    :data:`RESPONSE_TOPIC` to :meth:`on_response`. Commands sent on one
    connection are applied by the broker in order, so a grant published before
    a Deploy command is in force when the device receives the command.
    """

    def __init__(self, publish: Publish, timeout_s: float = 10.0, connected: Callable[[], bool] = lambda: True) -> None:
        self._publish = publish
        self.timeout_s = timeout_s
        self._connected = connected
        self._lock = threading.Lock()
        self._waiting: dict[str, _Waiter] = {}
        self._granted: set[tuple[str, str]] = set()

    # ------------------------------------------------------------ wire --

    def on_response(self, payload: bytes) -> None:
        """An answer from the plugin (MQTT thread)."""
        try:
            responses = json.loads(payload).get("responses", [])
        except (ValueError, AttributeError):
            log.warning("dynamic-security: unreadable response %r", payload[:200])
            return
        if not isinstance(responses, list):
            return
        by_request: dict[str, list[dict[str, Any]]] = {}
        for response in responses:
            if not isinstance(response, dict):
                continue
            corr = str(response.get("correlationData", ""))
            request_id = corr.split(":", 1)[0]
            by_request.setdefault(request_id, []).append(response)
            error = response.get("error")
            if request_id not in self._waiting and error:
                expected = any(word in str(error).lower() for word in ("exists", "not found"))
                level = logging.DEBUG if expected else logging.WARNING
                log.log(level, "dynamic-security %s: %s", response.get("command"), error)
        with self._lock:
            for request_id, answers in by_request.items():
                waiter = self._waiting.get(request_id)
                if waiter is not None:
                    waiter.answers.extend(answers)
                    if len(waiter.answers) >= waiter.expected:
                        waiter.done.set()

    def send(self, commands: list[dict[str, Any]]) -> None:
        """Publish ``commands`` in one message without waiting (errors in the answer are logged)."""
        self._publish_tagged(secrets.token_hex(8), commands)

    def _publish_tagged(self, request_id: str, commands: list[dict[str, Any]]) -> None:
        tagged = [{**c, "correlationData": f"{request_id}:{i}"} for i, c in enumerate(commands)]
        self._publish(CONTROL_TOPIC, json.dumps({"commands": tagged}).encode())

    def call(self, commands: list[dict[str, Any]], timeout_s: float | None = None) -> dict[int, str | None]:
        """Send ``commands`` and wait for every answer: {index: error or None}. Raises DynsecError on silence."""
        if not self._connected():
            raise DynsecError("the controller is not connected to the broker")
        waiter = _Waiter(len(commands))
        request_id = secrets.token_hex(8)
        with self._lock:
            self._waiting[request_id] = waiter
        try:
            self._publish_tagged(request_id, commands)
            if not waiter.done.wait(self.timeout_s if timeout_s is None else timeout_s):
                raise DynsecError(
                    "the broker did not answer the dynamic-security command in time: is the controller connected,"
                    " and is mosquitto's dynamic security plugin loaded with the controller as its administrator?"
                )
        finally:
            with self._lock:
                self._waiting.pop(request_id, None)
        result: dict[int, str | None] = {}
        for answer in waiter.answers:
            index = int(str(answer.get("correlationData", ":0")).split(":", 1)[1] or 0)
            error = answer.get("error")
            result[index] = str(error) if error else None
        return result

    # ------------------------------------------------------- operations --

    def ensure_device(self, device_id: str, password: str) -> None:
        """(Re)create a device's client and role with ``password``; an existing session is disconnected."""
        role = device_role(device_id)
        commands: list[dict[str, Any]] = [
            {"command": "deleteClient", "username": device_id},
            {"command": "deleteRole", "rolename": role},
            {"command": "createRole", "rolename": SHARED_DEVICE_ROLE},  # "already exists" after the first
            {"command": "createRole", "rolename": role, "acls": device_acls(device_id)},
            {
                "command": "createClient",
                "username": device_id,
                "clientid": device_id,
                "password": password,
                "textname": f"slmfleet device {device_id}",
                "roles": [{"rolename": role}, {"rolename": SHARED_DEVICE_ROLE}],
            },
        ]
        result = self.call(commands)
        for index in (3, 4):
            if index not in result:
                raise DynsecError(f"the broker did not answer {commands[index]['command']} for {device_id}")
            if result[index] is not None:
                raise DynsecError(f"the broker refused {commands[index]['command']} for {device_id}: {result[index]}")
        self._forget(device_id)

    def remove_device(self, device_id: str) -> None:
        """Delete a device's client (it is disconnected at once) and its role."""
        result = self.call(
            [
                {"command": "deleteClient", "username": device_id},
                {"command": "deleteRole", "rolename": device_role(device_id)},
            ]
        )
        if 0 not in result:
            raise DynsecError(f"the broker did not answer deleteClient for {device_id}")
        error = result[0]
        if error is not None and "not found" not in error.lower():
            raise DynsecError(f"the broker refused deleteClient for {device_id}: {error}")
        self._forget(device_id)

    def grant_artifact(self, device_id: str, artifact_id: str) -> None:
        """Let a device subscribe to an artifact's chunk broadcast (sent before its Deploy command)."""
        key = (device_id, artifact_id)
        with self._lock:
            if key in self._granted:
                return
            self._granted.add(key)
        self.send([{"command": "addRoleACL", "rolename": device_role(device_id), **artifact_acl(artifact_id)}])

    def set_fleet_artifact_access(self, fleet: bool) -> None:
        """Let every enrolled device read every artifact broadcast (``fleet``), or only those deployed to it."""
        acl = {"acltype": "subscribePattern", "topic": ALL_ARTIFACTS}
        change = (
            {"command": "addRoleACL", "rolename": SHARED_DEVICE_ROLE, **acl, "priority": 0, "allow": True}
            if fleet
            else {"command": "removeRoleACL", "rolename": SHARED_DEVICE_ROLE, **acl}
        )
        self.send([{"command": "createRole", "rolename": SHARED_DEVICE_ROLE}, change])

    def _forget(self, device_id: str) -> None:
        with self._lock:
            self._granted = {g for g in self._granted if g[0] != device_id}

    def forget_grants(self) -> None:
        """After a reconnect nothing is assumed (the broker may have been restored from a backup)."""
        with self._lock:
            self._granted.clear()


def prepare(state_dir: Path) -> tuple[Path, str]:
    """The plugin file of an embedded broker in ``state_dir`` and the controller's password, made on first use.

    An existing file is kept: it holds every enrolled device's credentials. It
    must still let the controller in with the password kept beside it.
    """
    path = state_dir / "dynamic-security.json"
    secret_file = state_dir / "controller.secret"
    if path.is_file():
        if not secret_file.is_file():
            raise BrokerError(
                f"{secret_file} is missing but {path} exists: restore it, or delete {path}"
                " (every device must then enroll again)"
            )
        secret = secret_file.read_text().strip()
        if not controller_password_matches(path, secret):
            raise BrokerError(
                f"the controller's password in {secret_file} does not match its client in {path}: restore the"
                f" pair, or delete {path} (every device must then enroll again)"
            )
        return path, secret
    secret = read_or_create_secret(secret_file)
    write_initial_config(path, secret)
    return path, secret


def controller_password_matches(path: Path, password: str, user: str = CONTROLLER_USER) -> bool:
    """Whether the plugin file at ``path`` lets ``user`` in with ``password``."""
    try:
        config = json.loads(path.read_text())
        client = next(c for c in config.get("clients", []) if c.get("username") == user)
        salt = base64.b64decode(client["salt"])
        expected = hash_password(password, salt, int(client["iterations"]))["password"]
    except (OSError, ValueError, KeyError, StopIteration, TypeError):
        return False
    return secrets.compare_digest(expected, str(client.get("password", "")))
