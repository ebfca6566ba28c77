"""What every gRPC servicer shares (`marketplace/rpc/<service>.py`, thin adapters over the same
`service.py` functions REST calls; `server.py` serves them all):

- authentication by the REST JWT (flask-jwt-extended format: HS256, `sub` = user
  id string, `type` = access, `jti`), sent as `authorization: Bearer <token>`;
- one DB session per call (`@rpc` / `@rpc_stream`);
- before any method, `marketplace/rpc/guard.py`: REST's rate limits on the same counters, and
  stream slots that keep server streams from taking every thread;
- the one table mapping `marketplace.errors` to gRPC status codes (`ERROR_CODES`).

Error mapping (the gRPC twin of `api/errors.py`):

| domain error       | REST | gRPC                |
|--------------------|------|---------------------|
| InvalidInput       | 422  | INVALID_ARGUMENT    |
| NotFound           | 404  | NOT_FOUND           |
| PermissionDenied   | 403  | PERMISSION_DENIED   |
| Unauthenticated    | 401  | UNAUTHENTICATED     |
| QuotaExceeded, RateLimited | 429 | RESOURCE_EXHAUSTED (`retry-after` seconds in the trailing metadata, as REST's Retry-After) |
| PaymentRequired    | 402  | FAILED_PRECONDITION |
| Conflict           | 409  | FAILED_PRECONDITION (ALREADY_EXISTS when a servicer says so, e.g. a duplicate email) |
| Unavailable, DB/Redis/broker/store down | 503 | UNAVAILABLE |

Insufficient balance is FAILED_PRECONDITION, not RESOURCE_EXHAUSTED: retrying
never helps, the account must be topped up first (gRPC's rule of thumb: "the
system is not in a state required for the operation"), while
RESOURCE_EXHAUSTED stays the signal for quotas and rate limits. The domain
error's title travels in the trailing metadata `error-title`; InvalidInput's
per-field list in `error-fields` (JSON), so a client can name the field.
"""
from __future__ import annotations

import functools
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.orm import Session

from marketplace.infra import errors
from marketplace.infra.db import new_session
from marketplace.infra.errors import unavailable_dependency
from marketplace.users import tokens
from marketplace.users.models import User

logger = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

# Most specific first: the first matching class wins.
ERROR_CODES: list[tuple[type[errors.MarketplaceError], grpc.StatusCode]] = [
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.PaymentRequired, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Conflict, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
]


class AlreadyExists(errors.Conflict):
    """A Conflict that means "the thing exists" (duplicate email): ALREADY_EXISTS, not FAILED_PRECONDITION."""


def status_code_for(exc: errors.MarketplaceError) -> grpc.StatusCode:
    if isinstance(exc, AlreadyExists):
        return grpc.StatusCode.ALREADY_EXISTS
    for cls, code in ERROR_CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INVALID_ARGUMENT  # a bare MarketplaceError is a 400


@dataclass
class Failure:
    code: grpc.StatusCode
    detail: str
    metadata: list[tuple[str, str]] = field(default_factory=list)


def to_failure(exc: BaseException) -> Failure:
    if isinstance(exc, errors.MarketplaceError):
        meta = [("error-title", exc.title)]
        if isinstance(exc, errors.QuotaExceeded):  # REST's Retry-After
            meta.append(("retry-after", str(exc.retry_after)))
        if isinstance(exc, errors.InvalidInput) and exc.errors:
            meta.append(("error-fields", json.dumps(exc.errors, default=str)))
        return Failure(status_code_for(exc), exc.detail, meta)
    dependency = unavailable_dependency(exc)
    if dependency:
        logger.warning("%s unavailable: %s", dependency, exc)
        return Failure(grpc.StatusCode.UNAVAILABLE, f"the {dependency} is unavailable; try again shortly")
    logger.exception("unhandled error in a gRPC method")
    return Failure(grpc.StatusCode.INTERNAL, "an unexpected error occurred; it has been logged")


def _abort(context: grpc.ServicerContext, failure: Failure) -> None:
    if failure.metadata:
        context.set_trailing_metadata(tuple(failure.metadata))
    context.abort(failure.code, failure.detail)


# -- authentication ---------------------------------------------------------------------------

def decode_token(token: str, *, expected_type: str = "access") -> dict[str, Any]:
    """Verify a token as REST does (signature, expiry, type, revocation)."""
    return tokens.decode(token, expected_type=expected_type)


def user_from_token(session: Session, token: str) -> User:
    from marketplace.users import service as users

    payload = decode_token(token)
    try:
        return users.get_user(session, user_id=payload["sub"])
    except errors.NotFound:
        raise errors.Unauthenticated("the token's user no longer exists") from None


def bearer_token(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key.lower() == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise errors.Unauthenticated("malformed authorization metadata: expected 'Bearer <token>'")
            return token.strip()
    raise errors.Unauthenticated("missing authorization metadata: send 'authorization: Bearer <access token>'")


def issue_tokens(user: User) -> dict[str, Any]:
    """An access/refresh pair exactly as REST's login issues them."""
    return tokens.token_pair(str(user.id), user.role)


# -- per-call plumbing --------------------------------------------------------------------------

@dataclass
class Call:
    """What a servicer method gets: the DB session, the caller (if authenticated), the context."""

    session: Session
    context: grpc.ServicerContext
    user: User | None = None

    @property
    def me(self) -> User:
        if self.user is None:
            raise errors.Unauthenticated("not authenticated")
        return self.user

    def admin(self) -> User:
        if not self.me.is_admin:
            raise errors.PermissionDenied("administrators only")
        return self.me

    def user_or_admin(self, user_id: str) -> uuid.UUID:
        """`user_id` when the caller is it or an admin; the caller's id when empty."""
        if not user_id or user_id == str(self.me.id):
            return self.me.id
        self.admin()
        try:
            return uuid.UUID(user_id)
        except ValueError:
            raise errors.InvalidInput.field("user_id", "not a valid id") from None


def _open(context: grpc.ServicerContext, auth: bool, auditor: bool = False) -> Call:
    call = Call(session=new_session(), context=context)
    if auth:
        try:
            call.user = user_from_token(call.session, bearer_token(context))
            if call.user.is_auditor and not auditor:
                raise errors.PermissionDenied("the auditor role reads the audit log and nothing else")
        except BaseException:
            call.session.close()
            raise
    return call


def rpc(*, auth: bool = True, auditor: bool = False) -> Callable[[F], F]:
    """Unary method: session per call, caller from the JWT, domain errors → status codes.
    `auditor`: a caller with the auditor role may call it (by default, no method)."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            failure = None
            call = None
            try:
                call = _open(context, auth, auditor)
                return fn(self, request, call)
            except Exception as exc:  # mapped to a status below; never leaks a stack trace
                failure = to_failure(exc)
            finally:
                if call is not None:
                    call.session.close()
            _abort(context, failure)

        return wrapper  # type: ignore[return-value]

    return deco


def rpc_stream(*, auth: bool = True) -> Callable[[F], F]:
    """Server-streaming method: like `rpc`, with the session held for the stream's life."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            failure = None
            call = None
            try:
                call = _open(context, auth)
                yield from fn(self, request, call)
            except Exception as exc:
                failure = to_failure(exc)
            finally:
                if call is not None:
                    call.session.close()
            if failure is not None:
                _abort(context, failure)

        return wrapper  # type: ignore[return-value]

    return deco


# -- conversions shared by the servicers -------------------------------------------------------

def timestamp(value: datetime | str | None) -> Timestamp | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    elif isinstance(value, int | float):
        value = datetime.fromtimestamp(value, UTC)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def money(value: Decimal | str | None) -> str:
    return "" if value is None else str(value)


def message(cls: type, **fields: Any) -> Any:
    """Build a protobuf message, leaving out fields whose value is None (proto3 has no null)."""
    return cls(**{k: v for k, v in fields.items() if v is not None})


def parse_json(value: str, *, field: str, default: Any = None) -> Any:
    if not value:
        return default
    try:
        return json.loads(value)
    except ValueError as exc:
        raise errors.InvalidInput.field(field, f"not valid JSON: {exc}") from None
    except RecursionError:  # valid JSON nested past the parser's stack (a Kafka record retried it forever)
        raise errors.InvalidInput.field(field, "nested too deeply") from None


def validation_error(exc: Any) -> errors.InvalidInput:
    """A pydantic ValidationError as InvalidInput naming each field (as REST does)."""
    out = []
    for e in exc.errors(include_url=False):
        name = ""
        for part in e["loc"]:
            name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
        out.append({"field": name or "request", "message": e["msg"]})
    return errors.InvalidInput(f"{out[0]['field']}: {out[0]['message']}", errors=out)
