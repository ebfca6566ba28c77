"""Rate limits (flask-limiter on Redis): per user by token identity, per IP when anonymous."""
from __future__ import annotations

import math
import time

from flask import Flask, Response, g, request
from flask_limiter import Limiter
from flask_limiter.errors import RateLimitExceeded

from marketplace.settings import Settings

EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


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

    limiter = Limiter(
        key_func=rate_key,
        app=app,
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
        retry = max(1, math.ceil(current.reset_at - time.time())) if current else 1
        resp = problem(429, "Too many requests", f"rate limit exceeded: {exc.description}",
                       limit=str(exc.limit.limit))
        resp.headers["Retry-After"] = str(retry)
        return resp

    app.extensions["marketplace.limiter"] = limiter
    return limiter
