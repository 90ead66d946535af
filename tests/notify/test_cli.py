"""``slmfleet webhooks`` against a controller served on a free port and a real receiver."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from sqlmodel import Session
from typer.testing import CliRunner

from controller.auth.tokens import Role, create_token
from controller.cli import app as cli_app
from controller.notify.events import EventType
from tests.helpers import wait_until
from tests.notify.receiver import Receiver
from tests.notify.test_webhooks import verified
from tests.security.conftest import LiveServer


def test_an_admin_manages_webhooks_from_the_command_line(
    live_server: Callable[..., LiveServer], tmp_path: Path
) -> None:
    live = live_server(None, webhook_retry_base_s=0.2)
    receiver = Receiver(script=[503]).start()
    runner = CliRunner()
    common = ["--api", live.url, "--token", live.admin_token]
    try:
        added = runner.invoke(cli_app, ["webhooks", "add", "pager", receiver.url, "--event", "rollout.*", *common])
        assert added.exit_code == 0, added.output
        secret = added.stdout.strip().splitlines()[-1]
        assert secret.startswith("whsec_")

        listed = runner.invoke(cli_app, ["webhooks", "list", *common])
        assert listed.exit_code == 0 and "pager" in listed.stdout and secret not in listed.stdout
        as_json = json.loads(runner.invoke(cli_app, ["webhooks", "list", "--json", *common]).stdout)
        assert as_json[0]["events"] == ["rollout.*"] and "secret" not in as_json[0]

        tested = runner.invoke(cli_app, ["webhooks", "test", "pager", *common])  # by name
        assert tested.exit_code == 0 and "ping queued" in tested.stdout, tested.output
        got = wait_until(lambda: [r for r in receiver.requests("ping") if r.status == 200], 15, what="ping")
        verified(secret, got[0])
        log = json.loads(runner.invoke(cli_app, ["webhooks", "deliveries", "pager", "--json", *common]).stdout)
        assert log[0]["status"] == "delivered" and log[0]["attempts"] == 2  # a 503, then delivered
        table = runner.invoke(cli_app, ["webhooks", "deliveries", *common]).stdout
        assert "ping" in table and "delivered" in table

        secret_file = tmp_path / "secret"
        secret_file.write_text("whsec_" + "A" * 40 + "\n")
        changed = runner.invoke(
            cli_app, ["webhooks", "update", "pager", "--disable", "--secret-file", str(secret_file), *common]
        )
        assert changed.exit_code == 0, changed.output
        shown = json.loads(runner.invoke(cli_app, ["webhooks", "show", "pager", "--json", *common]).stdout)
        assert shown["enabled"] is False and shown["delivered"] == 1
        refused = runner.invoke(cli_app, ["webhooks", "test", "pager", *common])
        assert refused.exit_code == 1 and "disabled" in refused.output and "Traceback" not in refused.output

        bad = runner.invoke(cli_app, ["webhooks", "add", "x", "http://h/x", "--event", "rollout.oops", *common])
        assert bad.exit_code == 1 and "Traceback" not in bad.output
        assert bad.output.strip().splitlines() == [
            "error: events: 'rollout.oops' matches no event; events are: " + ", ".join(t.value for t in EventType)
            + " (wildcards: rollout.*, *)"
        ]
        missing = runner.invoke(cli_app, ["webhooks", "show", "nope", *common])
        assert missing.exit_code == 1 and "no webhook named 'nope'" in missing.output

        with Session(live.runtime.engine) as session:
            operator, _ = create_token(session, "op", Role.OPERATOR)
        denied = runner.invoke(cli_app, ["webhooks", "list", "--api", live.url, "--token", operator])
        assert denied.exit_code == 1 and "403" in denied.output

        removed = runner.invoke(cli_app, ["webhooks", "remove", "pager", *common])
        assert removed.exit_code == 0 and json.loads(
            runner.invoke(cli_app, ["webhooks", "list", "--json", *common]).stdout
        ) == []
        events = runner.invoke(cli_app, ["webhooks", "events", *common]).stdout
        assert "rollout.awaiting_approval" in events and "device.offline" in events
    finally:
        receiver.stop()
