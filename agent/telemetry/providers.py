"""``python -m agent.telemetry.providers``: print onnxruntime's execution providers as a JSON list.

Run in a short-lived child by ``agent.telemetry.system.onnxruntime_info``, so the agent's own process
does not pay onnxruntime's import (~20 MiB of RSS) just to describe itself.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    import onnxruntime

    print(json.dumps(onnxruntime.get_available_providers()))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
