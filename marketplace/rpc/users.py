"""UserService over gRPC: a thin adapter over `marketplace.users.service`."""
from __future__ import annotations

from pydantic import ValidationError

from marketplace.billing import quotas
from marketplace.infra import errors, ratelimit
from marketplace.pb.user import user_pb2, user_pb2_grpc
from marketplace.rpc.calls import AlreadyExists, Call, issue_tokens, message, money, rpc, timestamp, validation_error
from marketplace.rpc.guard import client_address
from marketplace.users import service as users
from marketplace.users.models import User
from marketplace.users.schemas import Credentials


def user_message(user: User) -> user_pb2.User:
    q = quotas.effective_quotas(user)
    return message(
        user_pb2.User,
        id=str(user.id), email=user.email, role=user.role, balance=money(user.balance),
        quotas=user_pb2.Quotas(
            max_active_tasks=int(q["max_active_tasks"]),  # type: ignore[arg-type]
            max_items_per_task=int(q["max_items_per_task"]),  # type: ignore[arg-type]
            daily_spend_limit=str(q["daily_spend_limit"] or ""),
        ),
        created_at=timestamp(user.created_at),
    )


class UserServicer(user_pb2_grpc.UserServiceServicer):
    @rpc(auth=False)
    def CreateUser(self, request: user_pb2.CreateUserRequest, call: Call) -> user_pb2.CreateUserResponse:
        try:
            body = Credentials(email=request.email, password=request.password)
        except ValidationError as exc:
            raise validation_error(exc) from None
        ratelimit.shared().signup(client_address(call.context))  # REST's register counts on the same counter
        try:
            user = users.create_user(call.session, email=body.email, password=body.password)
        except errors.Conflict as exc:
            raise AlreadyExists(exc.detail, **exc.extra) from None
        call.session.commit()
        return user_pb2.CreateUserResponse(user=user_message(user))

    @rpc(auth=False)
    def Authenticate(self, request: user_pb2.AuthenticateRequest, call: Call) -> user_pb2.AuthenticateResponse:
        user = ratelimit.shared().login(
            request.email, lambda: users.authenticate(call.session, email=request.email, password=request.password))
        return user_pb2.AuthenticateResponse(**issue_tokens(user))

    @rpc()
    def GetUser(self, request: user_pb2.GetUserRequest, call: Call) -> user_pb2.GetUserResponse:
        return user_pb2.GetUserResponse(user=user_message(call.me))
