"""JWTs for every transport: flask-jwt-extended's configuration, issuing and checking, and the blocklist.

REST configures its app with `configure` and issues with `token_pair` inside its request.
Transports without a Flask app of their own (gRPC) issue and check tokens through a small
Flask app configured the same way (`_issuer`), so both speak exactly the same claims.
"""
from __future__ import annotations

from datetime import timedelta
from functools import lru_cache
from typing import Any

BLOCKLIST_PREFIX = "marketplace:jwt:revoked:"


def revoke(jti: str, *, ttl_seconds: int) -> None:
    """Refuse the token `jti` for `ttl_seconds` (until it would have expired anyway)."""
    from marketplace.infra.redis_client import get_redis

    if ttl_seconds > 0:
        get_redis().set(BLOCKLIST_PREFIX + jti, "1", ex=ttl_seconds)


def is_revoked(jti: str, sid: str | None = None) -> bool:
    """Whether the token `jti`, or the login session `sid` it belongs to, was revoked (one call)."""
    from marketplace.infra.redis_client import get_redis

    keys = [BLOCKLIST_PREFIX + jti] + ([SESSION_PREFIX + sid] if sid else [])
    return bool(get_redis().exists(*keys))


# A login's tokens share a session id (claim `sid`): the refresh token and every access token
# minted from it. Logging out with any of them ends the session, so a refresh token kept by
# whoever had the access token no longer mints working ones (it did, for its 30 days).
SESSION_PREFIX = "marketplace:jwt:session-revoked:"


def revoke_session(sid: str) -> None:
    """Refuse every token of the session `sid`, for as long as its refresh token could live."""
    from marketplace.infra.redis_client import get_redis
    from marketplace.settings import get_settings

    ttl = int(timedelta(days=get_settings().refresh_token_days).total_seconds()) + 1
    get_redis().set(SESSION_PREFIX + sid, "1", ex=ttl)


def revoke_payload(payload: dict[str, Any]) -> None:
    """Log out: refuse this token until it would have expired, and its login session for good."""
    import time

    revoke(str(payload["jti"]), ttl_seconds=int(payload.get("exp", 0) - time.time()) + 1)
    if payload.get("sid"):
        revoke_session(str(payload["sid"]))


def configure(app: Any, settings: Any) -> None:
    """flask-jwt-extended's settings from ours (the caller registers its JWTManager)."""
    app.config["JWT_SECRET_KEY"] = settings.jwt_secret.get_secret_value()
    app.config["JWT_ACCESS_TOKEN_EXPIRES"] = timedelta(minutes=settings.access_token_minutes)
    app.config["JWT_REFRESH_TOKEN_EXPIRES"] = timedelta(days=settings.refresh_token_days)
    app.config["JWT_ALGORITHM"] = "HS256"
    app.config["JWT_DECODE_ALGORITHMS"] = ["HS256"]
    app.config["JWT_TOKEN_LOCATION"] = ["headers"]


@lru_cache(maxsize=4)
def _issuer(secret: str, access_minutes: float, refresh_days: float) -> Any:
    from flask import Flask
    from flask_jwt_extended import JWTManager

    from marketplace.settings import get_settings

    app = Flask("marketplace.tokens")
    configure(app, get_settings())
    JWTManager(app)
    return app


def _app_context() -> Any:
    from contextlib import nullcontext

    from flask import has_app_context

    from marketplace.settings import get_settings

    if has_app_context():
        return nullcontext()
    settings = get_settings()  # keyed by what the app is configured from: settings may change (tests)
    return _issuer(settings.jwt_secret.get_secret_value(), settings.access_token_minutes,
                   settings.refresh_token_days).app_context()


def access_token(user_id: str, role: str, sid: str | None = None) -> dict[str, Any]:
    """A new access token (`POST /v1/auth/refresh`: `sid` is the refresh token's session)."""
    from flask import current_app
    from flask_jwt_extended import create_access_token

    claims = {"role": role, **({"sid": sid} if sid else {})}
    with _app_context():
        expires = current_app.config["JWT_ACCESS_TOKEN_EXPIRES"]
        return {
            "access_token": create_access_token(identity=user_id, additional_claims=claims),
            "token_type": "Bearer",
            "expires_in": int(expires.total_seconds()),
        }


def token_pair(user_id: str, role: str) -> dict[str, Any]:
    """An access/refresh pair of a new login session, as `POST /v1/auth/login` answers it."""
    import uuid

    from flask_jwt_extended import create_refresh_token

    sid = uuid.uuid4().hex
    with _app_context():
        return {**access_token(user_id, role, sid),
                "refresh_token": create_refresh_token(identity=user_id, additional_claims={"role": role, "sid": sid})}


def decode(token: str, *, expected_type: str = "access") -> dict[str, Any]:
    """The claims of a valid token of `expected_type`; Unauthenticated naming what is wrong
    (bad signature or algorithm, expired, wrong type, revoked)."""
    import jwt
    from flask_jwt_extended import decode_token
    from flask_jwt_extended.exceptions import JWTExtendedException

    from marketplace.infra.errors import Unauthenticated

    try:
        with _app_context():
            payload = decode_token(token)
    except jwt.ExpiredSignatureError:
        raise Unauthenticated("the token has expired") from None
    except (jwt.InvalidTokenError, JWTExtendedException) as exc:
        raise Unauthenticated(f"invalid token: {exc}") from None
    if payload.get("type") != expected_type:
        raise Unauthenticated(f"invalid token: expected an {expected_type} token")
    if not isinstance(payload.get("sub"), str) or not payload.get("jti"):
        raise Unauthenticated("invalid token: subject and id must be strings")
    if is_revoked(str(payload["jti"]), payload.get("sid")):
        raise Unauthenticated("the token has been revoked")
    return payload


def subject(token: str) -> str | None:
    """The user id of an access token whose signature and expiry check out, else None.

    For rate-limit keys only (REST's `api.limits.rate_key` decodes the same way): no revocation
    check, which the call's own authentication does."""
    import jwt
    from flask_jwt_extended import decode_token
    from flask_jwt_extended.exceptions import JWTExtendedException

    try:
        with _app_context():
            payload = decode_token(token)
    except (jwt.InvalidTokenError, JWTExtendedException):
        return None
    sub = payload.get("sub")
    return sub if payload.get("type") == "access" and isinstance(sub, str) else None
