"""Rate limits that REST and gRPC share, counted on the same Redis counters.

flask-limiter (REST, `api/limits.py`) is built on the `limits` library; this module uses `limits`
directly, on the same storage, with the same fixed-window strategy and the same keys. A limit's
counter is `LIMITER/<PREFIX>/<identity>/<scope>/<amount>/<multiples>/<granularity>`, which is how
flask-limiter keys an application-wide limit (scope `global`), so a REST request and a gRPC call
from one client draw on one budget: nobody doubles theirs by using both doors.

- requests (scope `global`): every call, per user (`user:<id>`, for a valid access token;
  MARKETPLACE_RATE_LIMIT) or per address (`ip:<address>`; MARKETPLACE_ANONYMOUS_RATE_LIMIT).
  REST counts it in flask-limiter, gRPC in its server interceptor (`marketplace.rpc.guard`).
- sign-ups (scope `signup`): accounts created per address (MARKETPLACE_SIGNUP_RATE_LIMIT). Each
  account gets signup credits: without it one address made 120 accounts a minute.
- failed logins (scope `login-failures`): per account (MARKETPLACE_LOGIN_FAILURE_RATE_LIMIT).
  Once spent, every login to that account is refused until the window ends, the right password
  too, or the refusal would tell a guesser when a guess was right. The per-address request limit
  still bounds one address trying many accounts.

Redis down does not take the door down with it: like flask-limiter's in-memory fallback, the
counting goes on in this process's memory, and Redis is tried again after RETRY_REDIS_AFTER.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage, storage_from_string
from limits.strategies import FixedWindowRateLimiter, RateLimiter

from marketplace.infra.errors import RateLimited, Unauthenticated, unavailable_dependency
from marketplace.settings import Settings, get_settings

logger = logging.getLogger(__name__)
T = TypeVar("T")

PREFIX = "marketplace"  # flask-limiter's key_prefix
REQUESTS = "global"  # flask-limiter's scope for application-wide limits
SIGNUP = "signup"
LOGIN_FAILURES = "login-failures"
STRATEGY = "fixed-window"  # flask-limiter's name for FixedWindowRateLimiter
STORAGE_OPTIONS = {"socket_connect_timeout": 3, "socket_timeout": 5}
RETRY_REDIS_AFTER = 5.0  # seconds of counting in memory after Redis failed, before it is tried again


def storage_uri(settings: Settings) -> str:
    """Where the counters live, for flask-limiter and for this module alike."""
    return settings.redis_url


def request_identity(*, user_id: str | None, address: str | None) -> str:
    """`user:<id>` for a caller with a valid access token, else `ip:<address>` (REST's rate_key)."""
    return f"user:{user_id}" if user_id else f"ip:{address or 'unknown'}"


def request_limit(settings: Settings, identity: str) -> str:
    """The per-request limit of an identity: a user's, or an anonymous address's."""
    return settings.rate_limit if identity.startswith("user:") else settings.anonymous_rate_limit


class RateLimits:
    """The shared limits; with no settings given, the process's (read at each call)."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings
        self._limiters: dict[str, RateLimiter] = {}
        self._memory = FixedWindowRateLimiter(MemoryStorage())
        self._redis_down_until = 0.0
        self._lock = threading.Lock()

    @property
    def settings(self) -> Settings:
        return self._settings or get_settings()

    def request(self, identity: str) -> None:
        """Count one call of `identity` (see `request_identity`); RateLimited when it is over."""
        who = "user" if identity.startswith("user:") else "address"
        self._hit(request_limit(self.settings, identity), identity, REQUESTS, f"requests per {who}")

    def signup(self, address: str) -> None:
        """Count one sign-up from `address`; RateLimited when it is over."""
        self._hit(self.settings.signup_rate_limit, f"ip:{address or 'unknown'}", SIGNUP, "sign-ups per address")

    def login(self, email: str, attempt: Callable[[], T]) -> T:
        """Run `attempt` (a password check) unless the account's failed logins are spent; a
        failure (Unauthenticated) counts against the account."""
        from marketplace.users.service import normalize_email

        identity = f"account:{normalize_email(email)}"
        items = sorted(parse_many(self.settings.login_failure_rate_limit))
        for item in items:
            if not self._call(lambda limiter, i=item: limiter.test(i, PREFIX, identity, LOGIN_FAILURES)):
                raise self._refusal(item, identity, LOGIN_FAILURES, "failed logins per account")
        try:
            return attempt()
        except Unauthenticated:
            for item in items:
                self._call(lambda limiter, i=item: limiter.hit(i, PREFIX, identity, LOGIN_FAILURES))
            raise

    # -- counting -----------------------------------------------------------------------------

    def _hit(self, limit: str, identity: str, scope: str, what: str) -> None:
        # In flask-limiter's order (smallest window first), stopping at the first one spent.
        for item in sorted(parse_many(limit)):
            if not self._call(lambda limiter, i=item: limiter.hit(i, PREFIX, identity, scope)):
                raise self._refusal(item, identity, scope, what)

    def _refusal(self, item: RateLimitItem, identity: str, scope: str, what: str) -> RateLimited:
        reset = self._call(lambda limiter: limiter.get_window_stats(item, PREFIX, identity, scope).reset_time)
        retry = max(1, math.ceil(reset - time.time()))
        logger.info("rate limit %s (%s) exceeded by %s", item, what, identity)
        return RateLimited(f"rate limit exceeded: {item} ({what})", retry_after=retry, limit=str(item))

    def _call(self, use: Callable[[RateLimiter], T]) -> T:
        if time.monotonic() < self._redis_down_until:
            return use(self._memory)
        try:
            return use(self._limiter())
        except Exception as exc:
            if unavailable_dependency(exc) != "redis":
                raise
            logger.warning("rate limits: Redis unavailable (%s); counting in memory for %.0f s", exc,
                           RETRY_REDIS_AFTER)
            self._redis_down_until = time.monotonic() + RETRY_REDIS_AFTER
            return use(self._memory)

    def _limiter(self) -> RateLimiter:
        uri = storage_uri(self.settings)
        with self._lock:
            limiter = self._limiters.get(uri)
            if limiter is None:
                limiter = self._limiters[uri] = FixedWindowRateLimiter(storage_from_string(uri, **STORAGE_OPTIONS))
            return limiter


_shared = RateLimits()


def shared() -> RateLimits:
    """The process-wide limits, following the process's settings (gRPC, CLI)."""
    return _shared
