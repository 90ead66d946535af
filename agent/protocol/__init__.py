"""The wire contract between devices and the controller.

Everything that crosses MQTT is defined here: topic names (``topics``), message
models (``messages``) and their validation (``codec``). This package imports
nothing else from the project so that every other package can depend on it.
"""

from agent.protocol.topics import ROOT

SCHEMA_VERSION = 1

__all__ = ["ROOT", "SCHEMA_VERSION"]
