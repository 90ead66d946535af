"""A scenario's broker may be a cluster's nodes: a YAML list or a comma-separated string, one rotation."""

from __future__ import annotations

import pytest

from agent.transport.mqtt import parse_broker_url
from simulations.errors import ScenarioError
from simulations.scenario import bundled, load_scenario

NODES = ["mqtt://127.0.0.1:1884", "mqtt://127.0.0.1:1885", "mqtt://127.0.0.1:1886"]


@pytest.mark.parametrize("url", [NODES, ",".join(NODES)])
def test_broker_url_takes_a_list_of_nodes(url: list[str] | str) -> None:
    scenario = load_scenario(
        bundled("happy-path"), devices=10, overrides={"broker.url": url, "broker.protocol": "3.1.1"}
    )
    assert scenario.broker.url == ",".join(NODES)
    assert scenario.broker.protocol == "3.1.1"
    servers = parse_broker_url(scenario.broker.url)["servers"]
    assert servers == (("127.0.0.1", 1884), ("127.0.0.1", 1885), ("127.0.0.1", 1886))


def test_an_unknown_protocol_is_refused() -> None:
    with pytest.raises(ScenarioError, match="broker.protocol"):
        load_scenario(bundled("happy-path"), devices=10, overrides={"broker.protocol": "4"})
