"""The wire contract between devices and the controller, imported by both sides.

Everything that crosses MQTT or is signed is defined here: topic names (``topics``), message
models (``messages``) and their validation (``codec``), artifact manifests (``manifest``) and
chunk frames (``chunks``), every signed layout (``signing``), inference results (``results``)
and the latency histogram's bucket bounds (``histogram``). It imports nothing else from the
project (pydantic and cryptography only), so every other package can depend on it; the rule is
checked by tests/test_import_rules.py (see docs/ARCHITECTURE.md, "Packages and import rules").
"""

from wire.topics import ROOT

SCHEMA_VERSION = 1

__all__ = ["ROOT", "SCHEMA_VERSION"]
