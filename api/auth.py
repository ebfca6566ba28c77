"""JWT auth (flask-jwt-extended): access tokens carry the user id as a string subject."""
from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from flask import Flask, request
from flask_jwt_extended import JWTManager, current_user

from api.db import db
from marketplace.infra.errors import PermissionDenied, Unauthenticated
from marketplace.settings import Settings
from marketplace.users import tokens
from marketplace.users.models import User


class _JWTManager(JWTManager):
    """flask-jwt-extended, remembering the tokens it verified until they expire.

    Every request decodes its token twice (the rate limiter's key, then `jwt_required`), each
    a signature check and claim validation: ~8% of a submit's CPU. A token is the same string
    for its whole life and its claims cannot change, so the claims of one that verified are
    kept by that exact string (signature included) and reused while `exp` is in the future;
    anything else (expired, unknown, CSRF-bound) goes through the full decode. Revocation and
    the token type are checked after decoding, on every request, as before.
    """

    MAX_REMEMBERED = 4096

    def __init__(self) -> None:
        super().__init__()
        self._verified: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def _decode_jwt_from_config(self, encoded_token: str, csrf_value: Any = None, allow_expired: bool = False) -> dict:
        plain = csrf_value is None and not allow_expired
        if plain:
            claims = self._verified.get(encoded_token)
            if claims is not None and claims["exp"] > time.time():
                return dict(claims)
        claims = super()._decode_jwt_from_config(encoded_token, csrf_value, allow_expired)
        if plain and isinstance(claims.get("exp"), (int, float)):
            with self._lock:
                if len(self._verified) >= self.MAX_REMEMBERED:
                    self._verified.clear()  # a burst of distinct tokens: start over rather than track age
                self._verified[encoded_token] = dict(claims)
        return claims


jwt = _JWTManager()


def init_auth(app: Flask, settings: Settings) -> None:
    tokens.configure(app, settings)
    jwt.init_app(app)


def _unauthorized(message: str) -> Any:
    # Loaders run inside flask-jwt-extended's error handlers, where raising would become a 500.
    from api.errors import problem

    resp = problem(401, Unauthenticated.title, message)
    resp.headers["WWW-Authenticate"] = "Bearer"
    return resp


def revoke_token(payload: dict[str, Any]) -> None:
    """Refuse this token from now until it would have expired anyway."""
    tokens.revoke_payload(payload)
    from marketplace.audit.service import record as audit_record

    audit_record(actor=f"user:{payload.get('sub')}", action="user.logout", subject=f"user:{payload.get('sub')}",
                 data={"jti": payload.get("jti"), "token_type": payload.get("type"), "session": payload.get("sid")})


@jwt.token_in_blocklist_loader
def _is_revoked(_header: dict[str, Any], payload: dict[str, Any]) -> bool:
    return tokens.is_revoked(str(payload.get("jti", "")), payload.get("sid"))


# What the `auditor` role may call: the audit log's reads, its own session (tokens, /v1/me).
AUDITOR_ENDPOINTS = frozenset({"audit.records", "audit.chain_records", "audit.checkpoints_page", "audit.public_key",
                               "auth.logout", "auth.refresh", "me.profile"})


@jwt.user_lookup_loader
def _load_user(_header: dict[str, Any], payload: dict[str, Any]) -> User | None:
    try:
        user = db().get(User, uuid.UUID(payload["sub"]))
    except (KeyError, ValueError):
        return None
    if user is not None and user.is_auditor and request.endpoint not in AUDITOR_ENDPOINTS:
        # Raised out of the view's jwt_required, before the view runs: a 403 problem.
        raise PermissionDenied("the auditor role reads the audit log and nothing else")
    return user


@jwt.user_lookup_error_loader
def _user_gone(_header: dict[str, Any], _payload: dict[str, Any]) -> Any:
    return _unauthorized("the token's user no longer exists")


@jwt.unauthorized_loader
def _missing(reason: str) -> Any:
    return _unauthorized(f"missing or malformed Authorization header: {reason}")


@jwt.invalid_token_loader
def _invalid(reason: str) -> Any:
    return _unauthorized(f"invalid token: {reason}")


@jwt.expired_token_loader
def _expired(_header: dict[str, Any], _payload: dict[str, Any]) -> Any:
    return _unauthorized("the token has expired")


@jwt.revoked_token_loader
def _revoked(_header: dict[str, Any], _payload: dict[str, Any]) -> Any:
    return _unauthorized("the token has been revoked")


@jwt.needs_fresh_token_loader
def _not_fresh(_header: dict[str, Any], _payload: dict[str, Any]) -> Any:
    return _unauthorized("a fresh login is required")


def me() -> User:
    user = current_user
    if user is None:
        raise Unauthenticated("not authenticated")
    return user


def require_admin() -> User:
    user = me()
    if not user.is_admin:
        raise PermissionDenied("administrators only")
    return user


def access_token(user_id: str, role: str, sid: str | None = None) -> dict[str, Any]:
    return tokens.access_token(user_id, role, sid)


def token_pair(user: User) -> dict[str, Any]:
    return tokens.token_pair(str(user.id), user.role)
