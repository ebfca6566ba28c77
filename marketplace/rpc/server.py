"""The gRPC server: all seven services on one port, with health checking and reflection.

Servicers (`marketplace/<domain>/grpc.py`) are thin adapters over the same
`service.py` functions REST calls. This module holds what they share:

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
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
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
from marketplace.settings import get_settings
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


def _open(context: grpc.ServicerContext, auth: bool) -> Call:
    call = Call(session=new_session(), context=context)
    if auth:
        call.user = user_from_token(call.session, bearer_token(context))
    return call


def rpc(*, auth: bool = True) -> Callable[[F], F]:
    """Unary method: session per call, caller from the JWT, domain errors → status codes."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            failure = None
            call = None
            try:
                call = _open(context, auth)
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


# -- the server ---------------------------------------------------------------------------------

def _servicers() -> list[tuple[Any, Callable[[Any, grpc.Server], None], str]]:
    from marketplace.pb.audit import audit_pb2, audit_pb2_grpc
    from marketplace.pb.billing import billing_pb2, billing_pb2_grpc
    from marketplace.pb.result import result_pb2, result_pb2_grpc
    from marketplace.pb.scheduler import scheduler_pb2, scheduler_pb2_grpc
    from marketplace.pb.task import task_pb2, task_pb2_grpc
    from marketplace.pb.user import user_pb2, user_pb2_grpc
    from marketplace.pb.worker import worker_pb2, worker_pb2_grpc
    from marketplace.rpc.audit import AuditServicer
    from marketplace.rpc.billing import BillingServicer
    from marketplace.rpc.registry import WorkerServicer
    from marketplace.rpc.results import ResultServicer
    from marketplace.rpc.scheduling import SchedulerServicer
    from marketplace.rpc.tasks import TaskServicer
    from marketplace.rpc.users import UserServicer

    def name(pb2: Any, service: str) -> str:
        return pb2.DESCRIPTOR.services_by_name[service].full_name

    return [
        (TaskServicer(), task_pb2_grpc.add_TaskServiceServicer_to_server, name(task_pb2, "TaskService")),
        (SchedulerServicer(), scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server,
         name(scheduler_pb2, "SchedulerService")),
        (WorkerServicer(), worker_pb2_grpc.add_WorkerServiceServicer_to_server, name(worker_pb2, "WorkerService")),
        (ResultServicer(), result_pb2_grpc.add_ResultServiceServicer_to_server, name(result_pb2, "ResultService")),
        (BillingServicer(), billing_pb2_grpc.add_BillingServiceServicer_to_server,
         name(billing_pb2, "BillingService")),
        (AuditServicer(), audit_pb2_grpc.add_AuditServiceServicer_to_server, name(audit_pb2, "AuditService")),
        (UserServicer(), user_pb2_grpc.add_UserServiceServicer_to_server, name(user_pb2, "UserService")),
    ]


@dataclass
class GrpcServer:
    server: grpc.Server
    port: int
    health: Any
    service_names: list[str]
    slots: Any = None  # the stream slots (guard.StreamSlots)

    def start(self) -> None:
        from grpc_health.v1 import health_pb2

        self.server.start()
        for svc in ["", *self.service_names]:
            self.health.set(svc, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = 5.0) -> None:
        from grpc_health.v1 import health_pb2

        self.health.enter_graceful_shutdown()
        for svc in ["", *self.service_names]:
            self.health.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(grace).wait()


def build_server(*, host: str = "0.0.0.0", port: int = 50051, max_workers: int = 16) -> GrpcServer:
    """All services, health and reflection on `host:port` (port 0 picks a free one)."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from marketplace.infra import ratelimit
    from marketplace.rpc.guard import GuardInterceptor, StreamSlots, stream_capacity

    # Rate limits shared with REST, and streams capped below the pool size (marketplace/rpc/guard.py).
    slots = StreamSlots(total=stream_capacity(max_workers), per_caller=lambda: get_settings().grpc_streams_per_user)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=[GuardInterceptor(limits=ratelimit.shared(), slots=slots)],
        options=[("grpc.max_receive_message_length", get_settings().max_body_bytes)],
    )
    names = []
    for servicer, add, name in _servicers():
        add(servicer, server)
        names.append(name)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise RuntimeError(f"could not bind the gRPC server to {host}:{port}")
    return GrpcServer(server=server, port=bound, health=health_servicer, service_names=names, slots=slots)


def serve(*, host: str = "0.0.0.0", port: int = 50051, max_workers: int = 16) -> None:
    """Run until SIGINT/SIGTERM; health turns NOT_SERVING first so balancers drain."""
    srv = build_server(host=host, port=port, max_workers=max_workers)
    srv.start()
    logger.info("gRPC listening on %s:%d (%s)", host, srv.port, ", ".join(srv.service_names))
    stopped = threading.Event()

    def _stop(*_: Any) -> None:
        stopped.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    stopped.wait()
    srv.stop()
