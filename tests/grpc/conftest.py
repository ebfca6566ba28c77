"""A real gRPC server (all services) on a free port, and helpers to call it as a user or admin."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest


@pytest.fixture(scope="session")
def grpc_target(stack: dict[str, str]) -> Iterator[str]:
    from marketplace.rpc.server import build_server

    server = build_server(host="127.0.0.1", port=0, max_workers=8)
    server.start()
    yield f"127.0.0.1:{server.port}"
    server.stop(grace=1)


@pytest.fixture(scope="session")
def channel(grpc_target: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(grpc_target) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        yield ch


@pytest.fixture(scope="session")
def stubs(channel: grpc.Channel) -> Any:
    from types import SimpleNamespace

    from marketplace.pb.audit import audit_pb2_grpc
    from marketplace.pb.billing import billing_pb2_grpc
    from marketplace.pb.result import result_pb2_grpc
    from marketplace.pb.scheduler import scheduler_pb2_grpc
    from marketplace.pb.task import task_pb2_grpc
    from marketplace.pb.user import user_pb2_grpc
    from marketplace.pb.worker import worker_pb2_grpc

    return SimpleNamespace(
        tasks=task_pb2_grpc.TaskServiceStub(channel),
        scheduler=scheduler_pb2_grpc.SchedulerServiceStub(channel),
        workers=worker_pb2_grpc.WorkerServiceStub(channel),
        results=result_pb2_grpc.ResultServiceStub(channel),
        billing=billing_pb2_grpc.BillingServiceStub(channel),
        audit=audit_pb2_grpc.AuditServiceStub(channel),
        users=user_pb2_grpc.UserServiceStub(channel),
    )


def _login(stubs: Any, email: str, password: str) -> dict[str, Any]:
    from marketplace.pb.user import user_pb2

    tokens = stubs.users.Authenticate(user_pb2.AuthenticateRequest(email=email, password=password))
    return {"email": email, "password": password, "token": tokens.access_token, "tokens": tokens,
            "md": (("authorization", f"Bearer {tokens.access_token}"),)}


@pytest.fixture()
def new_user(stubs: Any) -> Any:
    """Register a user over gRPC and log in; returns {id, email, token, md (call metadata)}."""
    from marketplace.pb.user import user_pb2

    def make() -> dict[str, Any]:
        email = f"grpc-{uuid.uuid4().hex[:10]}@example.com"
        user = stubs.users.CreateUser(user_pb2.CreateUserRequest(email=email, password="correct horse battery")).user
        return {"id": user.id, **_login(stubs, email, "correct horse battery")}

    return make


@pytest.fixture()
def user(new_user: Any) -> dict[str, Any]:
    return new_user()


@pytest.fixture()
def admin(stubs: Any, stack: dict[str, str]) -> dict[str, Any]:
    """An admin: made in the database (there is no public way to become one), logged in over gRPC."""
    from marketplace.infra.db import session_scope
    from marketplace.users import service as users

    email = f"admin-{uuid.uuid4().hex[:10]}@example.com"
    with session_scope() as session:
        created = users.create_user(session, email=email, password="admin password 123", role="admin")
        user_id = str(created.id)
    return {"id": user_id, **_login(stubs, email, "admin password 123")}


def set_user(user_id: str, **values: Any) -> None:
    """Change a user row directly (quota overrides, balance) to reach an error path."""
    from marketplace.infra.db import session_scope
    from marketplace.users.models import User

    with session_scope() as session:
        session.execute(User.__table__.update().where(User.id == uuid.UUID(user_id)).values(**values))


@pytest.fixture()
def update_user() -> Any:
    return set_user


def code_of(call: Any, *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    err = info.value
    return err.code(), err.details(), dict(err.trailing_metadata() or ())


@pytest.fixture()
def rpc_error() -> Any:
    """rpc_error(stub.Method, request, metadata=...) -> (code, details, trailing metadata)."""
    return code_of
