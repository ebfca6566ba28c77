"""Audit log: records of a task, chain verification (admin), the public key."""
from __future__ import annotations

import uuid
from typing import Any

from flask import Blueprint, Response, jsonify
from flask_jwt_extended import jwt_required
from pydantic import BaseModel, ConfigDict, Field

from api.auth import me, require_admin
from api.db import db
from api.openapi import api_doc
from api.validation import parse_query
from marketplace.audit import service as audit
from marketplace.audit import signing
from marketplace.tasks import service as tasks

bp = Blueprint("audit", __name__, url_prefix="/v1/audit")


class AuditQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # A UUID as GET /v1/billing/ledger takes it: a malformed one is a 422 there and here.
    task_id: uuid.UUID | None = Field(None, description="records of one task (its owner or an admin)")
    limit: int = Field(100, ge=1, le=1000)
    cursor: int | None = Field(None, ge=0, description="next_cursor of the previous page (a seq)")


class AuditRecordOut(BaseModel):
    seq: int
    ts: str
    actor: str
    action: str
    subject: str
    task_id: str | None
    data: Any
    prev_hash: str
    hash: str
    signature: str = Field(description="hex Ed25519 signature over the 32 bytes of `hash`")


class AuditPage(BaseModel):
    records: list[AuditRecordOut]
    next_cursor: str | None


class VerifyOut(BaseModel):
    valid: bool
    length: int
    head: str
    first_bad_seq: int | None
    reason: str | None
    anchored_seq: int | None  # the head anchored outside PostgreSQL that was found intact
    pending: int


@bp.get("")
@api_doc(summary="Audit records in chain order: one task's (owner/admin), else your own (admin: all)",
         query=AuditQuery, responses={200: AuditPage}, tags=["audit"])
@jwt_required()
def records():  # type: ignore[no-untyped-def]
    query = parse_query(AuditQuery)
    user = me()
    session = db()
    task_id = str(tasks.get_task(session, task_id=query.task_id, user=user).id) if query.task_id else None
    audit.chain_pending()  # bring buffered subtask records in, so the view is current
    about = None if (task_id or user.is_admin) else f"user:{user.id}"
    docs, next_cursor = audit.list_records(session, task_id=task_id, about=about, after_seq=query.cursor,
                                           limit=query.limit)
    return jsonify({"records": docs, "next_cursor": str(next_cursor) if next_cursor else None})


@bp.get("/verify")
@api_doc(summary="Walk the chain; name the first bad sequence number (administrators only)",
         responses={200: VerifyOut}, tags=["audit"])
@jwt_required()
def verify():  # type: ignore[no-untyped-def]
    require_admin()
    audit.chain_pending()
    session = db()
    return jsonify({**audit.verify_chain(session), "pending": audit.pending_count(session)})


@bp.get("/public-key")
@api_doc(summary="The Ed25519 public key (PEM) that verifies record signatures", auth=False,
         responses={200: {"type": "string", "description": "PEM", "x-media-type": "application/x-pem-file"}},
         tags=["audit"])
def public_key():  # type: ignore[no-untyped-def]
    return Response(signing.public_key_pem(), mimetype="application/x-pem-file")
