"""The agent's sans-IO core: messages and time in, actions out.

Real devices drive it with ``agent.runtime`` over paho; the simulator drives
the same code over its own connections. Nothing here touches a socket, a file
or the wall clock.
"""

from agent.core.actions import Action, Publish, Subscribe
from agent.core.core import (
    AgentCore,
    CertificateHooks,
    CoreAction,
    CoreConfig,
    DeployCommand,
    DeploymentHooks,
    Reconnect,
    TelemetrySample,
    Unsubscribe,
)

__all__ = [
    "Action",
    "AgentCore",
    "CertificateHooks",
    "CoreAction",
    "CoreConfig",
    "DeployCommand",
    "DeploymentHooks",
    "Publish",
    "Reconnect",
    "Subscribe",
    "TelemetrySample",
    "Unsubscribe",
]
