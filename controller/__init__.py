"""slmfleet controller: registry, rollouts, telemetry, REST API, dashboard and CLI.

Nothing is built at import time; ``controller.app.create_app(settings)`` builds an app.
"""
