"""Rate limits (flask-limiter on Redis): per user by token identity, per IP when anonymous.

The counters are shared with gRPC (`marketplace/ratelimit.py`): the same storage, strategy and
keys. Sign-ups per address and failed logins per account are counted by the views through
`rate_limits()`, the same calls gRPC's UserService makes.
"""
from __future__ import annotations

import time

from flask import Flask, Response, current_app, g, request
from flask_limiter import HeaderNames, Limiter
from flask_limiter.errors import RateLimitExceeded

from marketplace.infra import ratelimit
from marketplace.settings import Settings

EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_LIMITER_RETRY_AFTER = "X-Limiter-Retry-After"


def client_address() -> str:
    return request.remote_addr or "unknown"


def rate_key() -> str:
    """`user:<id>` for a request carrying a valid access token, else `ip:<address>`."""
    if "rate_key" not in g:
        user_id = None
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            from flask_jwt_extended import decode_token

            try:
                user_id = decode_token(header[7:].strip())["sub"]
            except Exception:  # noqa: BLE001 - an invalid token is limited by IP; auth answers 401 later
                pass
        g.rate_key = ratelimit.request_identity(user_id=user_id, address=client_address())
    return g.rate_key


def rate_limits() -> ratelimit.RateLimits:
    """This app's sign-up and login limits (shared with gRPC)."""
    return current_app.extensions["marketplace.rate_limits"]


def init_limiter(app: Flask, settings: Settings) -> Limiter:
    def current_limit() -> str:
        return ratelimit.request_limit(settings, rate_key())

    # flask-limiter sets Retry-After on every response (the window's reset, even on a 200) and
    # raises an answer's own to it: a quota 429's 10 s or a 503's 5 s read as up to a minute. Its
    # header goes under a private name that `_own_retry_after` drops; the rate limit's own 429
    # sets Retry-After itself (`_too_many`). Registered first, so it runs after the limiter's.
    @app.after_request
    def _own_retry_after(response: Response) -> Response:
        response.headers.pop(_LIMITER_RETRY_AFTER, None)
        return response

    limiter = Limiter(
        key_func=rate_key,
        app=app,
        header_name_mapping={HeaderNames.RETRY_AFTER: _LIMITER_RETRY_AFTER},
        application_limits=[current_limit],
        # Storage, strategy and prefix as `marketplace.ratelimit` counts them: gRPC shares the counters.
        storage_uri=ratelimit.storage_uri(settings),
        storage_options=dict(ratelimit.STORAGE_OPTIONS),
        strategy=ratelimit.STRATEGY,
        headers_enabled=True,
        key_prefix=ratelimit.PREFIX,
        # Redis down must not take the API down with it: limits fall back to memory.
        in_memory_fallback_enabled=True,
        swallow_errors=True,
    )

    @limiter.request_filter
    def _exempt() -> bool:
        return request.path in EXEMPT_PATHS

    @app.errorhandler(RateLimitExceeded)
    def _too_many(exc: RateLimitExceeded) -> Response:
        from api.errors import problem

        current = limiter.current_limit
        # Truncated as flask-limiter does: the store's TTL is whole seconds, rounded up already.
        retry = max(1, int(current.reset_at - time.time())) if current else 1
        resp = problem(429, "Too many requests", f"rate limit exceeded: {exc.description}",
                       limit=str(exc.limit.limit))
        resp.headers["Retry-After"] = str(retry)
        return resp

    app.extensions["marketplace.limiter"] = limiter
    app.extensions["marketplace.rate_limits"] = ratelimit.RateLimits(settings)
    return limiter
