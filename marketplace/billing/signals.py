"""Charge every finished subtask from Celery's task_success (and task_failure) signals.

`workers.run_subtask` never raises out of a chord header; it returns
`{ok, subtask_id, task_id, user_id, model, device, items, seconds, ...}` for success
and failure alike, so `task_success` sees every final outcome. A success is normally
charged already, in the very statement that recorded it (`complete_and_charge`, marked
`charged` in the result): the handler then has nothing left to write. Retries are not final
and are not charged; the unique ledger constraint absorbs redeliveries. Should the
task ever raise, `task_failure` charges from the subtask's row if it is final.

`MARKETPLACE_BILLING_SIGNAL_CHARGES=false` turns the handlers off; charges are then
recorded by finalize (`service.backfill_charges`) from the subtask rows — same
amounts, later (used by bench/billing_audit.py to price the handlers).
"""
from __future__ import annotations

import logging
import uuid
from typing import Any

from celery.signals import task_failure, task_success

from marketplace.billing import service, subtask_charges
from marketplace.billing.models import HOLD_RELEASED
from marketplace.catalog import get_catalog
from marketplace.infra.db import session_scope
from marketplace.settings import get_settings

logger = logging.getLogger(__name__)
SUBTASK_TASK = "workers.run_subtask"


def _settle_late(late: set[uuid.UUID]) -> None:
    for task_id in late:
        with session_scope() as session:
            service.settle_late(session, task_id=task_id)


def charge_outcome(result: dict[str, Any], *, audit_hostname: str | None = None) -> bool:
    """Record the ledger row for one subtask outcome; True if it was new.

    With `audit_hostname`, the outcome's audit record is written in the same
    transaction: one commit per subtask outcome instead of two.
    """
    if not isinstance(result, dict):
        return False
    chargeable = not result.get("skipped") and bool(result.get("subtask_id"))
    spec = get_catalog().get(result.get("model") or "") if chargeable else None
    if (audit_hostname is not None and get_settings().audit_subtask_events == "pending"
            and all(result.get(k) for k in ("subtask_id", "task_id", "user_id"))):
        return _charge_in_one_statement(result, spec, audit_hostname)
    inserted = False
    with session_scope() as session:
        if spec is not None:
            amount, detail = _amount_and_detail(result, spec)
            inserted = service.record_subtask_charge(
                session,
                user_id=uuid.UUID(result["user_id"]),
                task_id=uuid.UUID(result["task_id"]),
                subtask_id=uuid.UUID(result["subtask_id"]),
                amount=amount,
                ok=bool(result["ok"]),
                detail=detail,
            )
        if audit_hostname is not None and result.get("subtask_id"):
            from marketplace.audit.signals import outcome_event

            outcome_event(session, hostname=audit_hostname, result=result)
        late = session.info.pop(service.LATE_KEY, set())
    _settle_late(late)
    return inserted


def _amount_and_detail(result: dict[str, Any], spec: Any) -> tuple[Any, str]:
    detail = service.charge_detail(result["model"], result["device"], result.get("items"), result.get("seconds"))
    if spec is None:
        return None, detail
    return service.subtask_cost(
        service.price_for(spec, result["device"]), seconds=float(result.get("seconds") or 0),
        items=int(result.get("items") or 0), ok=bool(result["ok"]),
    ), detail


def _charge_in_one_statement(result: dict[str, Any], spec: Any, hostname: str) -> bool:
    """The hot path: ledger row and audit records in one round trip (see subtask_charges)."""
    from marketplace.audit.signals import outcome_record

    amount, detail = _amount_and_detail(result, spec)
    inserted, hold_status = subtask_charges.charge_outcome(
        user_id=str(result["user_id"]), task_id=str(result["task_id"]), subtask_id=str(result["subtask_id"]),
        amount=amount, ok=bool(result.get("ok")), detail=detail,
        outcome_record=outcome_record(hostname=hostname, result=result),
    )
    if inserted and hold_status == HOLD_RELEASED:
        _settle_late({uuid.UUID(str(result["task_id"]))})  # the task settled before this charge landed
    return inserted


def charges_with_outcome() -> bool:
    """Whether a successful subtask's charge is written with its outcome (the default settings)."""
    settings = get_settings()
    return settings.billing_signal_charges and settings.audit_subtask_events == "pending"


def complete_and_charge(result: dict[str, Any], *, hostname: str) -> tuple[bool, int]:
    """Record a successful subtask's outcome, its charge and both audit records in one commit.

    `result` is the outcome `workers.run_subtask` is about to return; returns
    `progress.complete_subtask`'s (last open subtask, subtask count).
    """
    from marketplace.audit.signals import outcome_record

    amount, detail = _amount_and_detail(result, get_catalog().get(result.get("model") or ""))
    last, subtasks, inserted, hold_status = subtask_charges.complete_and_charge(
        key=result["key"], sha256=result["sha256"], seconds=result["seconds"], user_id=str(result["user_id"]),
        task_id=str(result["task_id"]), subtask_id=str(result["subtask_id"]), amount=amount, detail=detail,
        outcome_record=outcome_record(hostname=hostname, result=result),
    )
    if inserted and hold_status == HOLD_RELEASED:  # the task settled before this charge landed
        try:
            _settle_late({uuid.UUID(str(result["task_id"]))})
        except Exception:  # the outcome is committed: never retry the subtask over this
            logger.exception("billing: could not settle the late charge of %s", result["subtask_id"])
    return last, subtasks


def charge_from_row(subtask_id: str) -> bool:
    with session_scope() as session:
        inserted = service.charge_from_row(session, subtask_id=uuid.UUID(subtask_id))
        late = session.info.pop(service.LATE_KEY, set())
    _settle_late(late)
    return inserted


@task_success.connect
def _on_subtask_success(sender: Any = None, result: Any = None, **_: Any) -> None:
    if getattr(sender, "name", None) != SUBTASK_TASK or not get_settings().billing_signal_charges:
        return
    if isinstance(result, dict) and result.get("charged"):
        return  # charged with its outcome, audit records included (complete_and_charge)
    try:
        hostname = getattr(getattr(sender, "request", None), "hostname", None) or "unknown"
        charge_outcome(result, audit_hostname=hostname)
    except Exception:  # a lost charge must be visible, never silent (finalize backfills it)
        logger.exception("billing: could not record the charge for %s", (result or {}).get("subtask_id"))


@task_failure.connect
def _on_subtask_failure(sender: Any = None, args: Any = None, **_: Any) -> None:
    if getattr(sender, "name", None) != SUBTASK_TASK or not get_settings().billing_signal_charges or not args:
        return
    try:
        charge_from_row(str(args[0]))
    except Exception:
        logger.exception("billing: could not record the charge for failed subtask %s", args[0])
