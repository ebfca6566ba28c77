"""A credentialed node's steps, done by the platform for it (gRPC NodeService).

The node holds no database URL and no object-store key: the platform claims for it (only
subtasks of its queues), writes its part (only when signed by its enrolled key, for the run it
holds) and records every outcome through the lifecycle's own doors, fast paths included. A part
that is unsigned, signed by another key or does not match its hash is refused: the run goes back
to Pending (`lifecycle.retry`, held by this node) and is sent again, and this node is not given
that subtask again (`REFUSED_KEY`), so it runs elsewhere.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import asdict
from typing import Any

from sqlalchemy import select

from marketplace.audit import service as audit
from marketplace.infra.db import session_scope
from marketplace.infra.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from marketplace.providers import keys
from marketplace.providers.service import NodeIdentity
from marketplace.results import followup
from marketplace.tasks import lifecycle
from marketplace.tasks.models import SubTask, SubTaskStatus, Task

logger = logging.getLogger(__name__)
REFUSED_KEY = "marketplace:refused:{}"  # the nodes whose part of a subtask was refused
REFUSED_TTL_S = 24 * 3600


def _sid(subtask_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(subtask_id)
    except ValueError:
        raise InvalidInput.field("subtask_id", "not a valid id") from None


def _load(subtask_id: str) -> Any:
    with session_scope() as session:
        row = session.execute(
            select(SubTask.status, SubTask.worker, SubTask.attempts, SubTask.index, SubTask.items, SubTask.task_id,
                   SubTask.replica, SubTask.platform_paid, Task.user_id, Task.model, Task.queue)
            .join(Task, Task.id == SubTask.task_id).where(SubTask.id == _sid(subtask_id))).first()
    if row is None:
        raise NotFound(f"unknown subtask {subtask_id}", field="subtask_id")
    return row


def _work(subtask_id: str, row: Any, attempt: int) -> lifecycle.Work:
    queue = row.queue or "cpu."
    return lifecycle.Work(subtask_id=subtask_id, task_id=str(row.task_id), user_id=str(row.user_id), model=row.model,
                          device=queue.split(".", 1)[0], queue=row.queue or "", index=row.index, items=row.items,
                          inputs=[], params={}, attempts=attempt, replica=int(row.replica or 0),
                          platform_paid=bool(row.platform_paid))


def _refused_here(node: NodeIdentity, subtask_id: str) -> bool:
    from marketplace.infra.redis_client import get_redis

    try:
        return bool(get_redis().sismember(REFUSED_KEY.format(subtask_id), node.id))
    except Exception:
        logger.warning("could not read the refusals of %s", subtask_id, exc_info=True)
        return False


def _ticket_key() -> bytes:
    from marketplace.settings import get_settings

    return hashlib.sha256(b"marketplace-node-ticket:" + get_settings().jwt_secret.get_secret_value().encode()).digest()


def ticket(node: NodeIdentity, work_doc: str) -> str:
    """The platform's seal over a claimed run's facts, for this node: it comes back with the outcome,
    so that the outcome's statement need not read them again (one query fewer per subtask)."""
    return hmac.new(_ticket_key(), node.id.encode() + b"\n" + work_doc.encode(), hashlib.sha256).hexdigest()


def _sealed_work(node: NodeIdentity, subtask_id: str, attempt: int, work_doc: str, seal: str
                 ) -> lifecycle.Work | None:
    """The run's facts from a ticket this platform issued to this node for this subtask and attempt."""
    if not work_doc or not seal or not hmac.compare_digest(ticket(node, work_doc), seal):
        return None
    fields = json.loads(work_doc)
    if fields.get("subtask_id") != subtask_id or int(fields.get("attempts") or 0) != attempt:
        return None
    return lifecycle.Work(**{**fields, "inputs": [], "params": {}, "waited": None})


def claim(node: NodeIdentity, *, subtask_id: str, message_id: str, incarnation: str
          ) -> tuple[dict[str, Any] | None, lifecycle.Work | None]:
    """The node's claim (`lifecycle.claim` as the node): a subtask of its queues only."""
    _sid(subtask_id)
    if _refused_here(node, subtask_id):
        # Its part here was refused: another node runs it. FAILED_PRECONDITION: the node's message
        # goes back to the queue (a Celery retry, with a backoff) for another node to take.
        raise Conflict(f"a part of subtask {subtask_id} from node {node.name} was refused; it runs elsewhere")
    audit.carry_subtask_record(actor=f"node:{node.name}", action="subtask.started", subject=f"subtask:{subtask_id}",
                               data={"celery_id": message_id, "node_id": node.id})
    early, work = lifecycle.claim(subtask_id, node=node.hostname, message_id=message_id or None,
                                  incarnation=incarnation or None)
    if work is not None and work.queue not in node.queues:
        # Its broker user reaches only its queues' messages: a claim of another queue's subtask is
        # no message it got. Undone at once (the run goes back to Pending), and refused.
        lifecycle.retry(subtask_id, error=f"claimed by node {node.name} outside its queues", held_by=node.hostname)
        raise PermissionDenied(f"subtask {subtask_id} is on {work.queue}, not a queue of node {node.name}")
    if early is not None and early.pop("elsewhere", False):  # not for this node (verified results)
        from marketplace.scheduling.dispatch import redirect
        from marketplace.scheduling.replicas import redirect_target

        early_check = early.pop("early_check", False)
        target = None if early_check else redirect(subtask_id, refused_by=node.hostname)
        if target is None and early_check and redirect_target(subtask_id, refused_by=node.hostname) is not None:
            raise Conflict(early["error"])  # a spot check waiting for its batch's first run: later, elsewhere
        if target is None:
            recorded = lifecycle.drop_check(subtask_id, reason=f"spot check dropped: {early['error']}")
            if recorded.moved:  # a spot check no other node can run: the task does not wait on it
                followup.after_drop(recorded)
                return {**early, "skipped": True, "dropped": True}, None
            from marketplace.scheduling.replicas import fail_if_short

            if fail_if_short(subtask_id):  # fewer live nodes than its redundancy: its task failed, saying so
                return {**early, "skipped": True}, None
            # FAILED_PRECONDITION: the node's message goes back to the queue for another
            raise Conflict(early["error"])
        return {**early, "skipped": True, "redirected": target}, None
    if early is not None and early.pop("abandoned", False):  # it kept outliving its limit: fail it here
        row = _load(subtask_id)
        stuck = _work(subtask_id, row, int(row.attempts))
        recorded = lifecycle.fail(stuck, node=node.hostname, error=early["error"], seconds=0.0)
        followup.after_outcome(task_id=stuck.task_id, subtask_id=subtask_id, queue=stuck.queue, recorded=recorded)
        return stuck.outcome(ok=False, error=early["error"], seconds=0.0), None
    return early, work


def work_json(work: lifecycle.Work) -> str:
    return json.dumps(asdict(work))


def sealed_json(work: lifecycle.Work) -> str:
    return keys.sealed_fields(asdict(work))


def _held_work(node: NodeIdentity, subtask_id: str, attempt: int, work_doc: str, seal: str) -> lifecycle.Work:
    """The run's facts: from the claim's ticket (the outcome's statement then checks the run is
    still this node's), else read, and refused unless this node holds that attempt."""
    sealed = _sealed_work(node, subtask_id, attempt, work_doc, seal)
    if sealed is not None:
        return sealed
    row = _load(subtask_id)
    if row.status != SubTaskStatus.RUNNING.value or row.worker != node.hostname or int(row.attempts) != attempt:
        # Not this node's run (never claimed here, taken over, or another attempt): nothing moves.
        raise PermissionDenied(f"subtask {subtask_id} attempt {attempt} is not held by node {node.name}")
    return _work(subtask_id, row, attempt)


def complete(node: NodeIdentity, *, subtask_id: str, attempt: int, output: bytes, sha256: str, signature: str,
             seconds: float, work_doc: str = "", seal: str = "") -> dict[str, Any]:
    """Store the node's signed part and complete the run it holds, in the lifecycle's one statement."""
    from marketplace.infra.storage import get_store
    from marketplace.results.service import part_key

    work = _held_work(node, _sid(subtask_id) and subtask_id, attempt, work_doc, seal)
    actual = hashlib.sha256(output).hexdigest()
    if actual != sha256 or not keys.verify_part(node.public_key, signature, subtask_id=subtask_id, attempt=attempt,
                                                 sha256=sha256):
        reason = ("unsigned" if not signature else "output does not match its sha256" if actual != sha256
                  else "signature does not verify with the node's enrolled key")
        refuse(node, work, reason=reason, signature=signature)
        raise PermissionDenied(f"part of subtask {subtask_id} refused: {reason}")
    key = part_key(work.task_id, work.index, work.replica)
    get_store().put_bytes(key, output, "application/json")
    signed = {"node_id": node.id, "attempt": attempt, "signature": signature}
    recorded = lifecycle.complete(work, node=node.hostname, key=key, sha256=sha256, seconds=seconds, held=True,
                                  signed=signed)
    if not recorded.moved:  # taken over or ended between the read and the statement
        raise PermissionDenied(f"subtask {subtask_id} attempt {attempt} is not held by node {node.name} any more")
    outcome = work.outcome(ok=True, key=key, sha256=sha256, seconds=seconds)
    followup.after_outcome(task_id=work.task_id, subtask_id=subtask_id, queue=work.queue, recorded=recorded)
    if recorded.last:
        outcome["finalized"] = followup.finish(work.task_id, subtasks=recorded.subtasks)
    return outcome


def refuse(node: NodeIdentity, work: lifecycle.Work, *, reason: str, signature: str) -> None:
    """A refused part: its run goes back to Pending and is sent again, to another node."""
    from marketplace.infra.redis_client import get_redis
    from marketplace.scheduling.dispatch import resend

    error = f"part from node {node.name} refused: {reason}"
    logger.warning("subtask %s: %s", work.subtask_id, error)
    audit.record(actor=f"node:{node.name}", action="subtask.part_refused", subject=f"subtask:{work.subtask_id}",
                 task_id=work.task_id, pending=True,
                 data={"node_id": node.id, "attempt": work.attempts, "reason": reason, "signature": signature or None})
    try:
        r = get_redis()
        r.sadd(REFUSED_KEY.format(work.subtask_id), node.id)
        r.expire(REFUSED_KEY.format(work.subtask_id), REFUSED_TTL_S)
    except Exception:
        logger.warning("could not remember the refusal of %s", work.subtask_id, exc_info=True)
    if lifecycle.retry(work.subtask_id, error=error, held_by=node.hostname):
        with session_scope() as session:
            trace_id = session.scalar(select(Task.trace_id).where(Task.id == uuid.UUID(work.task_id)))
        resend(work.task_id, [work.subtask_id], queue=work.queue, model=work.model, trace_id=trace_id)


def lost(node: NodeIdentity, *, message_id: str) -> dict[str, Any]:
    """The node's message for a run failed without an outcome (its pool killed the run at the hard
    time limit): what the `lost_run` errback does, which the node cannot send (a control queue).
    Only for a run this node holds under that very message."""
    from marketplace.scheduling.lost import lost_run

    subtask_id = message_id.rpartition(":")[0]
    with session_scope() as session:
        held = session.execute(select(SubTask.worker, SubTask.celery_id, SubTask.status)
                               .where(SubTask.id == _sid(subtask_id))).first()
    if held is None or held.worker != node.hostname or held.celery_id != message_id:
        raise PermissionDenied(f"message {message_id} is not a run held by node {node.name}")
    return {"subtask_id": subtask_id, "lost": lost_run(message_id)}


def end(node: NodeIdentity, *, subtask_id: str, attempt: int, kind: str, error: str, seconds: float,
        work_doc: str = "", seal: str = "") -> dict[str, Any]:
    """A run the node held ended without a part: retry, fail for good, or stopped."""
    if kind not in ("retry", "fail", "stop"):
        raise InvalidInput.field("kind", "retry, fail, stop or lost")
    work = _held_work(node, _sid(subtask_id) and subtask_id, attempt, work_doc, seal)
    not_held = PermissionDenied(f"subtask {subtask_id} attempt {attempt} is not held by node {node.name}")
    if kind == "retry":
        if not lifecycle.retry(subtask_id, error=error, held_by=node.hostname):
            raise not_held
        return work.outcome(ok=False, retry=True, error=error)
    if kind == "fail":
        recorded = lifecycle.fail(work, node=node.hostname, error=error, seconds=seconds, held=True)
    else:
        recorded = lifecycle.stop(work, node=node.hostname, seconds=seconds, reason=error, held=True)
    if not recorded.moved:
        raise not_held
    followup.after_outcome(task_id=work.task_id, subtask_id=subtask_id, queue=work.queue, recorded=recorded)
    return work.outcome(ok=False, error=error, seconds=seconds, **({"stopped": True} if kind == "stop" else {}))


def heartbeat(node: NodeIdentity, *, info: dict[str, Any], leaving: bool) -> None:
    """The node's registry record, under its enrolled hostname and queues (never what it claims)."""
    from marketplace.infra.redis_client import get_redis
    from marketplace.registry import service as registry

    r = get_redis()
    if leaving:
        registry.deregister(r, hostname=node.hostname)
        with session_scope() as session:
            registry.record_offline(session, hostname=node.hostname)
        return
    queues = sorted(q for q in (info.get("queues") or []) if q in node.queues)
    record = {
        "hostname": node.hostname, "queues": queues, "models": sorted(info.get("models") or []),
        "unavailable": dict(info.get("unavailable") or {}), "concurrency": max(1, int(info.get("concurrency") or 1)),
        "running": int(info.get("running") or 0), "pid": info.get("pid"), "incarnation": info.get("incarnation"),
        "started_at": info.get("started_at") or time.time(), "facts": dict(info.get("facts") or {}),
        "node_id": node.id, "provider_id": node.provider_id,
    }
    first = not registry.claim_alive(r, hostname=node.hostname, incarnation=record["incarnation"])
    if first:
        with session_scope() as session:
            registry.record_online(session, info=record)
    registry.heartbeat(r, info=record)
    if not _still_enabled(node):  # disabled since this call authenticated: its deregister may be before our write
        registry.deregister(r, hostname=node.hostname)
        return
    if first:
        _wake(record)


def _still_enabled(node: NodeIdentity) -> bool:
    from marketplace.providers.models import Node

    with session_scope() as session:
        return bool(session.scalar(select(Node.enabled).where(Node.id == uuid.UUID(node.id))))


def _wake(record: dict[str, Any]) -> None:
    from marketplace.infra import names
    from marketplace.infra.celery_app import app

    runnable = [m for m in record["models"] if m not in record["unavailable"]]
    if runnable and record["queues"]:
        try:
            app.send_task(names.WAKE, args=[record["queues"], runnable], kwargs={"hostname": record["hostname"]},
                          queue=names.SCHEDULER_QUEUE, ignore_result=True)
        except Exception as exc:
            logger.warning("could not wake tasks waiting for %s: %s", record["hostname"], exc)


def stopped(node: NodeIdentity, *, task_id: str) -> bool:
    return bool(lifecycle.stopped(task_id))
