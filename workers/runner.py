"""Execute one subtask: load inputs, run the model, store the part, record the outcome.

The database row is the truth: a redelivered subtask that already finished returns
its recorded outcome without running again, and its part key is deterministic.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import DBAPIError

from marketplace.billing import signals as billing
from marketplace.infra.errors import database_unavailable
from marketplace.infra.storage import StorageError, get_store
from marketplace.registry.signals import incarnation
from marketplace.results.service import encode_part, part_key, run_after_commit
from marketplace.tasks import progress
from workers import node
from workers.executors import ExecContext, ExecutionError, get_executor

logger = logging.getLogger(__name__)


@dataclass
class Retry:
    """Ask the Celery task to retry later."""

    error: str
    infrastructure: bool = False


def execute(
    subtask_id: str, *, hostname: str, retries_left: bool, message_id: str | None = None
) -> dict[str, Any] | Retry:
    """Run a subtask to a final outcome dict, or return Retry."""
    try:
        early, work = progress.claim_subtask(subtask_id, hostname=hostname, message_id=message_id,
                                             incarnation=incarnation())
    except DBAPIError as exc:
        if not database_unavailable(exc):
            raise
        return Retry(f"database unavailable: {exc.orig}", infrastructure=True)
    if early is not None:
        if early.pop("abandoned", False):  # it kept outliving its time limit: fail it, with the reason
            return _failure(subtask_id, early, early["error"], time.perf_counter(), retryable=False)
        return early
    base = work["base"]
    index = base["index"]
    started = time.perf_counter()
    try:
        refused = node.refusal(base["model"])
        if refused:
            # Another node on the same queue may have a sandbox: retry, then fail with the reason.
            raise ExecutionError(f"node {hostname} refuses {base['model']}: {refused}", retryable=True)
        executor = get_executor(base["model"], base["device"])
        ctx = ExecContext(task_id=base["task_id"], subtask_id=subtask_id, user_id=base["user_id"],
                          device=base["device"], store=get_store())
        outputs = executor.run(work["inputs"], work["params"], ctx)
        if len(outputs) != base["items"]:
            raise ExecutionError(f"model returned {len(outputs)} outputs for {base['items']} items")
        data = encode_part(outputs)
        key = part_key(base["task_id"], index)
        sha = get_store().put_bytes(key, data, "application/json")
    except ExecutionError as exc:
        return _failure(subtask_id, base, str(exc), started, retryable=exc.retryable and retries_left)
    except StorageError as exc:
        return _failure(subtask_id, base, f"object store: {exc}", started, retryable=retries_left)
    except Exception as exc:  # the model crashed: retry, then fail with the reason
        logger.exception("subtask %s crashed", subtask_id)
        return _failure(subtask_id, base, f"{type(exc).__name__}: {exc}", started, retryable=retries_left)
    outcome = {**base, "ok": True, "key": key, "sha256": sha, "seconds": round(time.perf_counter() - started, 6)}
    try:
        if billing.charges_with_outcome():
            last, subtasks = billing.complete_and_charge(outcome, hostname=hostname)
            outcome["charged"] = True  # task_success's billing handler has nothing left to write
        else:
            last, subtasks = progress.complete_subtask(subtask_id, key=key, sha256=sha, seconds=outcome["seconds"])
    except DBAPIError as exc:
        if not database_unavailable(exc):
            raise
        return Retry(f"database unavailable: {exc.orig}", infrastructure=True)
    if last and subtasks <= INLINE_FINALIZE_MAX_SUBTASKS:
        if _finalize_inline(base["task_id"]):
            outcome["finalized"] = True
    elif last:
        _request_finalize(base["task_id"])
    return outcome


# A small task's last subtask finishes the task itself, a broker round trip and a chord
# callback sooner (about a third of a one-item job's latency), and then leaves its chord
# (`workers.tasks`): no callback is sent. When it could not finish the task, the callback
# does. A big job's last subtask (a long join) sends finalize instead.
INLINE_FINALIZE_MAX_SUBTASKS = 16
INLINE_FINALIZE_SPAN = "inline/marketplace.results.finalize"


def _finalize_inline(task_id: str) -> bool:
    """Whether this call finished the task (it is Done or Failed now)."""
    from opentelemetry import trace

    from marketplace.results.service import finalize_task

    try:
        # Its own span in the job's trace, where the chord callback's run would have been.
        with trace.get_tracer(__name__).start_as_current_span(INLINE_FINALIZE_SPAN):
            if finalize_task(task_id) not in ("done", "failed"):
                return False
    except Exception:  # the chord callback (and its retries) finishes the task instead
        logger.warning("inline finalize of task %s failed; the chord callback will finish it", task_id,
                       exc_info=True)
        return False
    from marketplace.audit.signals import request_chaining

    try:
        request_chaining()  # what the callback's success signal would have asked for
    except Exception:  # the beat's periodic chaining picks the records up
        logger.warning("could not ask for the audit chaining after task %s", task_id, exc_info=True)
    return True


def _request_finalize(task_id: str) -> None:
    """A big job's last subtask asks for finalize too (a message: the join is long). Its chord
    callback usually comes first and the second finalize finds the task final; but a chord that
    was only partly sent (the broker dropped out mid-dispatch) never calls back, and the re-sent
    copies of its running subtasks are skipped, which left the task to recovery."""
    from marketplace.infra.celery_app import app
    from marketplace.scheduling.service import FINALIZE, last_subtask_finalize_id

    try:
        app.send_task(FINALIZE, args=[task_id], queue="marketplace.results", task_id=last_subtask_finalize_id(task_id))
    except Exception:  # the chord callback, or recovery, finishes the task instead
        logger.warning("could not ask for the finalize of task %s", task_id, exc_info=True)


def _failure(subtask_id: str, base: dict[str, Any], error: str, started: float, *, retryable: bool) -> dict[str, Any] | Retry:
    seconds = round(time.perf_counter() - started, 6)
    if retryable:
        logger.warning("subtask %s attempt failed, will retry: %s", subtask_id, error)
        progress.release_subtask(subtask_id, error=error)
        return Retry(error)
    logger.error("subtask %s failed: %s", subtask_id, error)
    run_after_commit(progress.fail_subtask(subtask_id, error=error, seconds=seconds, index=base["index"]))
    return {**base, "ok": False, "error": error, "seconds": seconds}
