"""Audit log: records of a task, the chain's pages (admin, auditor), its checkpoints, chain
verification (admin), the public key, and task receipts."""
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
from marketplace.audit import checkpoints, signing
from marketplace.audit import service as audit
from marketplace.infra.errors import PermissionDenied
from marketplace.tasks import service as tasks

bp = Blueprint("audit", __name__, url_prefix="/v1/audit")
receipts_bp = Blueprint("receipts", __name__, url_prefix="/v1/tasks")


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
    about = None if (task_id or user.reads_audit_log) else f"user:{user.id}"
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


class ChainQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    after_seq: int = Field(0, ge=0, le=2**63 - 1, description="records with seq above this (next_after_seq of the previous page)")
    limit: int = Field(1000, ge=1, le=5000)


class ChainRecordOut(BaseModel):
    seq: int
    ts: str = Field(description="YYYY-MM-DDTHH:MM:SS.ffffffZ, exactly as hashed")
    actor: str
    action: str
    subject: str
    task_id: str | None
    data_json: str = Field(description="the record's canonical JSON text, exactly as hashed")
    prev_hash: str
    hash: str
    signature: str = Field(description="hex Ed25519 signature over the 32 bytes of `hash`")


class ChainPage(BaseModel):
    records: list[ChainRecordOut]
    next_after_seq: int | None


class CheckpointQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    after_size: int = Field(0, ge=0, le=2**63 - 1, description="checkpoints larger than this (next_after_size of the previous page)")
    limit: int = Field(100, ge=1, le=1000)


class CheckpointOut(BaseModel):
    log: str
    size: int
    head: str = Field(description="hash of record `size`")
    root: str = Field(description="RFC 9162 Merkle root over the hashes of records 1..size")
    time: str
    signature: str = Field(description="hex Ed25519 signature (see the README: verifying the audit log)")


class CheckpointPage(BaseModel):
    checkpoints: list[CheckpointOut]
    next_after_size: int | None


class ReceiptPendingOut(BaseModel):
    status: str
    seq: int | None
    retry_after: int
    detail: str


@bp.get("/records")
@api_doc(summary="The whole chain in seq order, every field as hashed and signed (administrators, auditors)",
         query=ChainQuery, responses={200: ChainPage}, tags=["audit"],
         description="For `marketplace audit verify --url`, which checks every hash, link and signature itself "
                     "with the public key. The `auditor` role reads this, the checkpoints and nothing else.")
@jwt_required()
def chain_records():  # type: ignore[no-untyped-def]
    query = parse_query(ChainQuery)
    if not me().reads_audit_log:
        raise PermissionDenied("administrators and auditors only")
    audit.chain_pending()
    docs, next_seq = audit.chain_page(db(), after_seq=query.after_seq, limit=query.limit)
    return jsonify({"records": docs, "next_after_seq": next_seq})


@bp.get("/checkpoints")
@api_doc(summary="Signed checkpoints of the chain in size order (public: they are published)",
         query=CheckpointQuery, responses={200: CheckpointPage}, auth=False, tags=["audit"])
def checkpoints_page():  # type: ignore[no-untyped-def]
    query = parse_query(CheckpointQuery)
    docs, next_size = checkpoints.list_checkpoints(db(), after_size=query.after_size, limit=query.limit)
    return jsonify({"checkpoints": docs, "next_after_size": next_size})


@receipts_bp.get("/<task_id>/receipt")
@api_doc(summary="A finished task's receipt: its completion record, signed, with an inclusion proof against "
                 "a signed checkpoint (owner only)",
         responses={200: {"type": "object", "description": "the receipt (canonical JSON; check it with "
                                                           "`marketplace audit check-receipt`)"},
                    202: ReceiptPendingOut},
         tags=["audit"],
         description="409 until the task has finished. 202 with Retry-After while no published checkpoint covers "
                     "its completion record yet (one is signed every MARKETPLACE_AUDIT_CHECKPOINT_EVERY records "
                     "or MARKETPLACE_AUDIT_CHECKPOINT_INTERVAL seconds).")
@jwt_required()
def receipt(task_id: str):  # type: ignore[no-untyped-def]
    session = db()
    out = checkpoints.task_receipt(session, task_id=task_id, user=me())
    if isinstance(out, checkpoints.ReceiptPending):
        resp = jsonify({"status": "pending", "seq": out.seq, "retry_after": out.retry_after, "detail": out.detail})
        resp.status_code = 202
        resp.headers["Retry-After"] = str(out.retry_after)
        return resp
    return Response(out, mimetype="application/json")
