"""AuditService over gRPC: a thin adapter over `marketplace.audit.service`."""
from __future__ import annotations

from typing import Any

from sqlalchemy import select

from marketplace.audit import service as audit
from marketplace.audit import signing
from marketplace.audit.models import AuditRecord
from marketplace.infra import errors
from marketplace.pb.audit import audit_pb2, audit_pb2_grpc
from marketplace.rpc.calls import Call, message, parse_json, rpc, timestamp
from marketplace.tasks import service as tasks
from marketplace.tasks.storable import check_storable

DEFAULT_PAGE, MAX_PAGE = 100, 1000  # as REST GET /v1/audit


def record_message(doc: dict[str, Any]) -> audit_pb2.AuditRecord:
    """A `list_records` document as an AuditRecord message (data back to its canonical JSON text)."""
    data = doc.get("data")
    return message(
        audit_pb2.AuditRecord,
        seq=int(doc["seq"]), ts=timestamp(doc["ts"].replace("Z", "+00:00")), actor=doc["actor"],
        action=doc["action"], subject=doc["subject"], task_id=doc.get("task_id") or "",
        data_json=data if isinstance(data, str) else audit.canonical_json(data),
        prev_hash=doc["prev_hash"], hash=doc["hash"], signature=doc["signature"],
    )


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    @rpc()
    def Append(self, request: audit_pb2.AppendRequest, call: Call) -> audit_pb2.AppendResponse:
        admin = call.admin()
        if not request.action or not request.subject:
            raise errors.InvalidInput.field("action" if not request.action else "subject", "required")
        # The columns' limits: `append` would cut a longer value, and the read-back below,
        # matching the whole one, then found nothing and answered UNAVAILABLE for a written record.
        for name in ("action", "subject"):
            limit = AuditRecord.__table__.c[name].type.length
            if len(getattr(request, name)) > limit:
                raise errors.InvalidInput.field(name, f"at most {limit} characters")
        data = parse_json(request.data_json, field="data_json", default={})
        if not isinstance(data, dict):
            raise errors.InvalidInput.field("data_json", "must encode a JSON object")
        check_storable({"action": request.action, "subject": request.subject, "data_json": data})
        task_id = str(tasks.get_task(call.session, task_id=request.task_id).id) if request.task_id else None
        actor = f"user:{admin.id}"
        audit.append(call.session, actor=actor, action=request.action, subject=request.subject, data=data,
                     task_id=task_id)
        call.session.commit()
        # append() chains at commit and returns nothing: read our record back (newest with these fields).
        row = call.session.scalar(
            select(AuditRecord).where(AuditRecord.actor == actor, AuditRecord.action == request.action,
                                      AuditRecord.subject == request.subject,
                                      AuditRecord.data == audit.canonical_json(data))
            .order_by(AuditRecord.seq.desc()).limit(1)
        )
        if row is None:
            raise errors.Unavailable("the audit record was not written")
        return audit_pb2.AppendResponse(record=message(
            audit_pb2.AuditRecord, seq=row.seq, ts=timestamp(row.ts), actor=row.actor, action=row.action,
            subject=row.subject, task_id=row.task_id or "", data_json=row.data, prev_hash=row.prev_hash,
            hash=row.hash, signature=row.signature,
        ))

    @rpc(auditor=True)
    def Query(self, request: audit_pb2.QueryRequest, call: Call) -> audit_pb2.QueryResponse:
        """As REST: a task's records (owner/admin); without a task, your own records (admin: all)."""
        user = call.me
        if not 0 <= request.limit <= MAX_PAGE:
            raise errors.InvalidInput.field("limit", f"between 1 and {MAX_PAGE} (0 for the default)")
        task_id = None
        if request.task_id:
            task_id = str(tasks.get_task(call.session, task_id=request.task_id, user=user).id)
        audit.chain_pending()  # bring buffered subtask records in, so the view is current
        about = None if (task_id or user.reads_audit_log) else f"user:{user.id}"
        docs, next_seq = audit.list_records(call.session, task_id=task_id, about=about,
                                            after_seq=request.after_seq or None, limit=request.limit or DEFAULT_PAGE)
        return audit_pb2.QueryResponse(records=[record_message(d) for d in docs], next_after_seq=next_seq or 0)

    @rpc()
    def Verify(self, request: audit_pb2.VerifyRequest, call: Call) -> audit_pb2.VerifyResponse:
        call.admin()
        audit.chain_pending()
        result = audit.verify_chain(call.session)
        head = result.get("head") or ""
        return audit_pb2.VerifyResponse(
            valid=bool(result["valid"]), length=int(result["length"]),
            head="" if head == audit.GENESIS else head, first_bad_seq=int(result.get("first_bad_seq") or 0),
            reason=result.get("reason") or "",
        )

    @rpc(auth=False)
    def GetPublicKey(self, request: audit_pb2.GetPublicKeyRequest, call: Call) -> audit_pb2.GetPublicKeyResponse:
        return audit_pb2.GetPublicKeyResponse(algorithm="ed25519", public_key_pem=signing.public_key_pem())
