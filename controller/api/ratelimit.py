"""Rate limits on the REST API: token buckets per source address and per token; 429 with Retry-After.

Every request under ``/api/`` takes a token from its source address's bucket and, when it carries an
``Authorization`` header, one from that token's bucket (``api_rate_per_s``, ``api_burst``): one client
cannot starve the others by opening more connections, nor by spreading one token over many addresses.
``POST /api/v1/enroll`` takes no operator token, so it has buckets of its own per source and per
enrollment token (``enroll_rate_per_s``, ``enroll_burst``). A refused request costs nothing beyond the
bucket: it is answered before its body is read, its token is looked up or the database is touched.

The source is the client's address as uvicorn reports it: behind a reverse proxy on the same machine,
the address the proxy forwards (uvicorn trusts ``X-Forwarded-For`` from 127.0.0.1 only). The buckets are
in memory, per controller process.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import OrderedDict

from prometheus_client import Counter
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from controller.settings import ControllerSettings
from controller.telemetry.ratelimit import TokenBuckets

log = logging.getLogger(__name__)

API_PREFIX = "/api/"
ENROLL_PATH = "/api/v1/enroll"
#: a refused source or token is logged at most this often
LOG_EVERY_S = 60.0


def _key(secret: str) -> str:
    """A bucket key for a token that does not keep the token itself in memory."""
    return hashlib.sha256(secret.encode(errors="replace")).hexdigest()[:32]


class ApiLimits:
    """The buckets and what they refused; ``check_*`` answer 0.0 (go on) or the seconds to wait."""

    def __init__(self, settings: ControllerSettings, throttled: Counter) -> None:
        def buckets(rate: float, burst: int) -> TokenBuckets | None:
            return TokenBuckets(rate, burst) if rate > 0 else None

        self.api_rate, self.api_burst = settings.api_rate_per_s, settings.api_burst
        self.enroll_rate, self.enroll_burst = settings.enroll_rate_per_s, settings.enroll_burst
        self.by_source = buckets(self.api_rate, self.api_burst)
        self.by_token = buckets(self.api_rate, self.api_burst)
        self.enroll_by_source = buckets(self.enroll_rate, self.enroll_burst)
        self.enroll_by_token = buckets(self.enroll_rate, self.enroll_burst)
        #: requests refused, by limit (source, token, enroll_source, enroll_token)
        self.throttled = throttled
        self._logged: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def _take(self, buckets: TokenBuckets | None, key: str, limit: str, who: str) -> float:
        if buckets is None:
            return 0.0
        wait = buckets.take(key)
        if wait:
            self.throttled.labels(limit).inc()
            self._log(f"{limit}:{key}", f"REST API: too many requests {who} ({limit} limit): refused with 429")
        return wait

    def _log(self, key: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._logged.get(key)
            if last is not None and now - last < LOG_EVERY_S:
                return
            self._logged[key] = now
            self._logged.move_to_end(key)
            while len(self._logged) > 10_000:
                self._logged.popitem(last=False)
        log.warning("%s", message)

    def check_request(self, source: str, path: str, authorization: str | None) -> tuple[float, str]:
        """Take what a request costs: (0.0, "") or (seconds to wait, why)."""
        wait = self._take(self.by_source, source, "source", f"from {source}")
        if wait:
            return wait, self._why(f"from {source}", self.api_rate, self.api_burst, wait)
        if authorization:
            wait = self._take(self.by_token, _key(authorization), "token", f"with one token (from {source})")
            if wait:
                return wait, self._why("with this token", self.api_rate, self.api_burst, wait)
        if path == ENROLL_PATH:
            wait = self._take(self.enroll_by_source, source, "enroll_source", f"to enroll from {source}")
            if wait:
                return wait, self._why(f"to enroll from {source}", self.enroll_rate, self.enroll_burst, wait)
        return 0.0, ""

    def check_enrollment_token(self, secret: str, source: str) -> tuple[float, str]:
        """Take an attempt with one enrollment token (read from the body, so checked by the route)."""
        wait = self._take(self.enroll_by_token, _key(secret), "enroll_token", f"with one enrollment token ({source})")
        if wait:
            return wait, self._why("with this enrollment token", self.enroll_rate, self.enroll_burst, wait)
        return 0.0, ""

    @staticmethod
    def _why(who: str, rate: float, burst: int, wait: float) -> str:
        return (
            f"too many requests {who}: at most {rate:g} a second on average (bursts of {burst});"
            f" try again in {retry_after(wait)} s"
        )


def retry_after(wait: float) -> int:
    """``Retry-After`` in whole seconds, at least 1."""
    return max(1, math.ceil(wait))


def too_many(wait: float, why: str) -> JSONResponse:
    """The 429 every limit answers."""
    return JSONResponse({"detail": why}, status_code=429, headers={"Retry-After": str(retry_after(wait))})


class RateLimitMiddleware:
    """Answers 429 before the app sees a request over its limits (pure ASGI: bodies are not buffered)."""

    def __init__(self, app: ASGIApp, limits: ApiLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        source = str(client[0]) if client else "unknown"
        authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        wait, why = self.limits.check_request(source, scope["path"], authorization)
        if wait:
            await too_many(wait, why)(scope, receive, send)
            return
        await self.app(scope, receive, send)
