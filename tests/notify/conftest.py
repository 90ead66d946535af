"""The rollout tests' model versions and device peers, for the webhook tests' real rollouts."""

from tests.rollouts.test_rollouts import fleet, versions  # noqa: F401 - fixtures
from tests.security.conftest import live_server  # noqa: F401, E402 - fixture
