"""slmfleet agent: the device service (MQTT, model slots, inference, telemetry)."""

__version__ = "0.1.0"
