"""Periodic chaining of buffered audit records (beat, queue `marketplace.maintenance`)."""
from __future__ import annotations

import logging

from marketplace.audit import service
from marketplace.infra import names
from marketplace.infra.celery_app import app

logger = logging.getLogger(__name__)


@app.task(name=names.CHAIN_AUDIT, acks_late=True, ignore_result=True)
def chain_pending() -> int:
    moved = service.chain_pending()
    if moved:
        logger.info("audit: chained %s buffered records", moved)
    return moved


@app.task(name=names.VERIFY_AUDIT, acks_late=True, ignore_result=True)
def verify() -> dict:
    """Walk the whole chain and publish the verdict as `marketplace_audit_chain_valid` (alerted on)."""
    from marketplace.infra.db import session_scope
    from marketplace.observability.metrics import record_audit_verification

    with session_scope() as session:
        report = service.verify_chain(session)
    record_audit_verification(valid=report["valid"], length=report.get("length"), head=report.get("head"))
    if not report["valid"]:
        logger.error("audit: chain verification FAILED at seq %s: %s", report.get("first_bad_seq"),
                     report.get("reason"))
    return report


@app.task(name=names.CHECKPOINT_AUDIT, acks_late=True, ignore_result=True)
def checkpoint() -> dict | None:
    """Chain what is buffered, then sign and publish a checkpoint if one is due (`checkpoints`)."""
    from marketplace.audit import checkpoints

    service.chain_pending()
    return checkpoints.write_checkpoint()
