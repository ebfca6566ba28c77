"""Rate limits (flask-limiter on Redis): per user by token identity, per IP when anonymous."""
from __future__ import annotations

import time

from flask import Flask, Response, g, request
from flask_limiter import HeaderNames, Limiter
from flask_limiter.errors import RateLimitExceeded

from marketplace.settings import Settings

EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_LIMITER_RETRY_AFTER = "X-Limiter-Retry-After"


def rate_key() -> str:
    """`user:<id>` for a request carrying a valid access token, else `ip:<address>`."""
    if "rate_key" not in g:
        g.rate_key = f"ip:{request.remote_addr or 'unknown'}"
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            from flask_jwt_extended import decode_token

            try:
                g.rate_key = f"user:{decode_token(header[7:].strip())['sub']}"
            except Exception:  # noqa: BLE001 - an invalid token is limited by IP; auth answers 401 later
                pass
    return g.rate_key


def init_limiter(app: Flask, settings: Settings) -> Limiter:
    def current_limit() -> str:
        return settings.rate_limit if rate_key().startswith("user:") else settings.anonymous_rate_limit

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
        storage_uri=settings.redis_url,
        storage_options={"socket_connect_timeout": 3, "socket_timeout": 5},
        strategy="fixed-window",
        headers_enabled=True,
        key_prefix="marketplace",
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
    return limiter
