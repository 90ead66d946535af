"""Per-device token buckets: a device that floods is throttled, the others are not affected."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBuckets:
    """``rate`` tokens a second per key, at most ``burst`` saved up; one message costs one token.

    Thread-safe and bounded: beyond ``max_keys`` the longest-idle bucket is forgotten (a forgotten
    device starts again with a full bucket, which only matters with more devices than ``max_keys``).
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate must be > 0, burst and max_keys >= 1")
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, updated)
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        """Take a token for ``key``; False (nothing taken) when its bucket is empty."""
        return self.take(key) == 0.0

    def take(self, key: str) -> float:
        """Take a token for ``key`` and return 0.0; or, when its bucket is empty, the seconds until it holds one."""
        now = self._clock()
        with self._lock:
            tokens, updated = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + max(0.0, now - updated) * self.rate)
            wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate
            if not wait:
                tokens -= 1.0
            self._buckets[key] = (tokens, now)
            self._buckets.move_to_end(key)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)
