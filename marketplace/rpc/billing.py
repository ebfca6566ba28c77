"""BillingService over gRPC: a thin adapter over `marketplace.billing.service`."""
from __future__ import annotations

import uuid
from typing import Any

from marketplace.billing import quotas
from marketplace.billing import service as billing
from marketplace.billing.models import LedgerEntry
from marketplace.infra import errors
from marketplace.pb.billing import billing_pb2, billing_pb2_grpc
from marketplace.rpc.calls import Call, message, rpc, timestamp
from marketplace.users import service as users

DEFAULT_PAGE, MAX_PAGE = 50, 500  # as REST GET /v1/billing/ledger


def entry_message(doc: dict[str, Any], *, user_id: str) -> billing_pb2.LedgerEntry:
    """An `entry_document` as a LedgerEntry message."""
    return message(
        billing_pb2.LedgerEntry,
        id=int(doc["id"]), user_id=user_id, task_id=doc.get("task_id") or "", subtask_id=doc.get("subtask_id") or "",
        kind=doc["kind"], amount=doc["amount"], detail=doc.get("detail") or "", settled=doc["settled"],
        created_at=timestamp(doc.get("created_at")),
    )


def _orm_entry(entry: LedgerEntry) -> billing_pb2.LedgerEntry:
    return entry_message(billing.entry_document(entry), user_id=str(entry.user_id))


class BillingServicer(billing_pb2_grpc.BillingServiceServicer):
    @rpc()
    def GetBalance(self, request: billing_pb2.GetBalanceRequest, call: Call) -> billing_pb2.GetBalanceResponse:
        user = users.get_user(call.session, user_id=call.user_or_admin(request.user_id))
        return billing_pb2.GetBalanceResponse(user_id=str(user.id), **billing.balance_document(call.session, user=user))

    @rpc()
    def GetLedger(self, request: billing_pb2.GetLedgerRequest, call: Call) -> billing_pb2.GetLedgerResponse:
        user_id = call.user_or_admin(request.user_id)
        if not 0 <= request.limit <= MAX_PAGE:
            raise errors.InvalidInput.field("limit", f"between 1 and {MAX_PAGE} (0 for the default)")
        try:
            task_id = uuid.UUID(request.task_id) if request.task_id else None
        except ValueError:
            raise errors.InvalidInput.field("task_id", "must be a task id (UUID)") from None
        try:
            cursor = int(request.cursor) if request.cursor else None
        except ValueError:
            cursor = 0
        if cursor is not None and cursor < 1:
            raise errors.InvalidInput.field("cursor", "not a cursor returned by this method")
        docs, next_cursor = billing.ledger_page(call.session, user_id=user_id, task_id=task_id,
                                                limit=request.limit or DEFAULT_PAGE, cursor=cursor)
        return billing_pb2.GetLedgerResponse(entries=[entry_message(d, user_id=str(user_id)) for d in docs],
                                             next_cursor=str(next_cursor) if next_cursor else "")

    @rpc()
    def Charge(self, request: billing_pb2.ChargeRequest, call: Call) -> billing_pb2.ChargeResponse:
        call.admin()
        amount = billing.parse_amount(request.amount)
        entry, created = billing.charge(call.session, task_id=request.task_id, subtask_id=request.subtask_id or None,
                                        amount=amount, kind=request.kind or "charge", detail=request.detail or None)
        late = call.session.info.pop(billing.LATE_KEY, set())
        call.session.commit()
        for task_id in late:
            billing.settle_late(call.session, task_id=task_id)
            call.session.commit()
        return billing_pb2.ChargeResponse(
            entry=entry_message(billing.entry_document(entry), user_id=str(entry.user_id)),
            created=created,
        )

    @rpc()
    def GetQuota(self, request: billing_pb2.GetQuotaRequest, call: Call) -> billing_pb2.GetQuotaResponse:
        user = users.get_user(call.session, user_id=call.user_or_admin(request.user_id))
        limits = quotas.effective_quotas(user)
        used = quotas.usage(call.session, user_id=user.id)
        return billing_pb2.GetQuotaResponse(
            user_id=str(user.id),
            quota=billing_pb2.Quota(max_active_tasks=int(limits["max_active_tasks"]),  # type: ignore[arg-type]
                                    max_items_per_task=int(limits["max_items_per_task"]),  # type: ignore[arg-type]
                                    daily_spend_limit=str(limits["daily_spend_limit"] or "")),
            usage=billing_pb2.QuotaUsage(active_tasks=int(used["active_tasks"]), spent_today=used["spent_today"]),
        )

    @rpc()
    def TopUp(self, request: billing_pb2.TopUpRequest, call: Call) -> billing_pb2.TopUpResponse:
        admin = call.admin()
        amount = billing.parse_amount(request.amount)
        entry = billing.topup(call.session, user_id=request.user_id, amount=amount, actor=f"user:{admin.id}")
        call.session.commit()
        user = users.get_user(call.session, user_id=entry.user_id)
        return billing_pb2.TopUpResponse(entry=_orm_entry(entry),
                                         balance=billing.balance_document(call.session, user=user)["balance"])
