"""Billing: balance, ledger, admin top-ups. Money travels as decimal strings."""
from __future__ import annotations

import uuid
from typing import Any

from flask import Blueprint, jsonify
from flask_jwt_extended import jwt_required
from pydantic import BaseModel, ConfigDict, Field

from api.auth import me, require_admin
from api.db import db
from api.openapi import api_doc
from api.validation import parse_body, parse_query
from marketplace.billing import service as billing

bp = Blueprint("billing", __name__, url_prefix="/v1/billing")


class BalanceOut(BaseModel):
    balance: str
    held: str
    available: str


class LedgerQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(50, ge=1, le=500)
    cursor: int | None = Field(None, ge=1, description="next_cursor of the previous page")
    task_id: uuid.UUID | None = None


class LedgerEntryOut(BaseModel):
    id: int
    kind: str = Field(description="signup | topup | charge | charge_failed | adjustment | earning (a provider's "
                      "share of a charge its node earned; GET /v1/providers/earnings)")
    amount: str = Field(description="decimal string; negative for charges")
    task_id: str | None
    subtask_id: str | None
    detail: str | None
    settled: bool = Field(description="applied to the balance (a task's charges are, when it settles)")
    created_at: str


class LedgerPage(BaseModel):
    entries: list[LedgerEntryOut]
    next_cursor: str | None


class TopUpRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str
    amount: Any = Field(description='a positive decimal string, e.g. "12.50" (floats are refused)')


class TopUpOut(BalanceOut):
    user_id: str
    entry: LedgerEntryOut


@bp.get("/balance")
@api_doc(summary="Your balance, the amount held by active tasks, and what is available",
         responses={200: BalanceOut}, tags=["billing"])
@jwt_required()
def balance():  # type: ignore[no-untyped-def]
    return jsonify(billing.balance_document(db(), user=me()))


@bp.get("/ledger")
@api_doc(summary="Your ledger, newest first (keyset pages; filter by task_id)", query=LedgerQuery,
         responses={200: LedgerPage}, tags=["billing"])
@jwt_required()
def ledger():  # type: ignore[no-untyped-def]
    query = parse_query(LedgerQuery)
    entries, next_cursor = billing.ledger_page(db(), user_id=me().id, task_id=query.task_id, limit=query.limit,
                                               cursor=query.cursor)
    return jsonify({"entries": entries, "next_cursor": str(next_cursor) if next_cursor else None})


@bp.post("/topup")
@api_doc(summary="Credit a user (administrators only)", request=TopUpRequest, responses={201: TopUpOut},
         tags=["billing"])
@jwt_required()
def topup():  # type: ignore[no-untyped-def]
    admin = require_admin()
    body = parse_body(TopUpRequest)
    amount = billing.parse_amount(body.amount)
    session = db()
    entry = billing.topup(session, user_id=body.user_id, amount=amount, actor=f"user:{admin.id}")
    session.commit()
    from marketplace.users.models import User

    user = session.get(User, entry.user_id)
    return jsonify({"user_id": str(entry.user_id), "entry": billing.entry_document(entry),
                    **billing.balance_document(session, user=user)}), 201
