"""Execute one subtask: claim it, run the model, store the part, record the outcome.

The database row is the truth (`marketplace.tasks.lifecycle`): a redelivered subtask that
already finished returns its recorded outcome without running again, and its part key is
deterministic. After each outcome the node asks the fair dispatcher for more work if its
queue's broker list runs short, and the last subtask of a task finishes the task.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import DBAPIError

from marketplace import observability
from marketplace.infra import names
from marketplace.infra.errors import database_unavailable
from marketplace.infra.storage import StorageError, get_store
from marketplace.registry.signals import incarnation
from marketplace.results.service import encode_part, part_key
from marketplace.tasks import lifecycle
from workers import node
from workers.executors import ExecContext, ExecutionError, Stopped, get_executor

logger = logging.getLogger(__name__)

# A small task's last subtask finishes the task itself, a broker round trip sooner (about a third
# of a one-item job's latency). A big job's last subtask (a long join) sends finalize instead.
INLINE_FINALIZE_MAX_SUBTASKS = 16
INLINE_FINALIZE_SPAN = "inline/marketplace.results.finalize"
# How often a running subtask looks whether its task ended (its node then stops it).
STOP_POLL_S = 0.25


@dataclass
class Retry:
    """Ask the Celery task to retry later."""

    error: str
    infrastructure: bool = False


def execute(subtask_id: str, *, hostname: str, retries_left: bool, message_id: str | None = None
            ) -> dict[str, Any] | Retry:
    """Run a subtask to a final outcome dict, or return Retry."""
    try:
        early, work = lifecycle.claim(subtask_id, node=hostname, message_id=message_id, incarnation=incarnation())
    except DBAPIError as exc:
        if not database_unavailable(exc):
            raise
        return Retry(f"database unavailable: {exc.orig}", infrastructure=True)
    if early is not None or work is None:
        early = early or {}
        if early.pop("abandoned", False):  # it kept outliving its time limit: fail it, with the reason
            return _failure(_work_of(early), hostname, early["error"], time.perf_counter(), retryable=False)
        return early
    if work.waited is not None:
        observability.task_started(model=work.model, queue=work.queue, waited=work.waited)
    started = time.perf_counter()
    try:
        refused = node.refusal(work.model)
        if refused:
            # Another node on the same queue may have a sandbox: retry, then fail with the reason.
            raise ExecutionError(f"node {hostname} refuses {work.model}: {refused}", retryable=True)
        executor = get_executor(work.model, work.device)
        ctx = ExecContext(task_id=work.task_id, subtask_id=subtask_id, user_id=work.user_id, device=work.device,
                          store=get_store(), stop_requested=_stop_watch(work.task_id))
        outputs = executor.run(work.inputs, work.params, ctx)
        if len(outputs) != work.items:
            raise ExecutionError(f"model returned {len(outputs)} outputs for {work.items} items")
        key = part_key(work.task_id, work.index)
        sha = get_store().put_bytes(key, encode_part(outputs), "application/json")
    except Stopped as exc:
        return _stopped(work, hostname, str(exc), started)
    except ExecutionError as exc:
        return _failure(work, hostname, str(exc), started, retryable=exc.retryable and retries_left)
    except StorageError as exc:
        return _failure(work, hostname, f"object store: {exc}", started, retryable=retries_left)
    except Exception as exc:  # the model crashed: retry, then fail with the reason
        logger.exception("subtask %s crashed", subtask_id)
        return _failure(work, hostname, f"{type(exc).__name__}: {exc}", started, retryable=retries_left)
    seconds = round(time.perf_counter() - started, 6)
    try:
        recorded = lifecycle.complete(work, node=hostname, key=key, sha256=sha, seconds=seconds)
    except DBAPIError as exc:
        if not database_unavailable(exc):
            raise
        return Retry(f"database unavailable: {exc.orig}", infrastructure=True)
    outcome = work.outcome(ok=True, key=key, sha256=sha, seconds=seconds)
    _after(work, recorded)
    if recorded.last:
        outcome["finalized"] = finish(work.task_id, subtasks=recorded.subtasks)
    return outcome


def _after(work: lifecycle.Work, recorded: lifecycle.Recorded) -> None:
    """What follows any outcome: a charge that landed after its task was settled is settled, and
    the fair dispatcher is asked for more work when the queue's broker list runs short. Neither may
    fail the subtask: its outcome is committed (recovery and beat cover both)."""
    if recorded.late_charge:
        try:
            from marketplace.billing.service import settle_late_now

            settle_late_now(work.task_id)
        except Exception:
            logger.exception("billing: could not settle the late charge of %s", work.subtask_id)
    try:
        from marketplace.scheduling.dispatch import release_if_low

        release_if_low(recorded.queue or work.queue)
    except Exception:
        logger.warning("could not release more work on %s", work.queue, exc_info=True)


def finish(task_id: str, *, subtasks: int) -> bool:
    """The task's last subtask ended: finish the task. Inline for a small task (True when this
    call finished it), by a `marketplace.results.finalize` message for a big one (a long join)."""
    if subtasks > INLINE_FINALIZE_MAX_SUBTASKS:
        _request_finalize(task_id)
        return False
    from opentelemetry import trace

    from marketplace.results.service import finalize_task

    try:
        # Its own span in the job's trace, where a finalize message's run would have been.
        with trace.get_tracer(__name__).start_as_current_span(INLINE_FINALIZE_SPAN):
            if finalize_task(task_id) not in ("done", "failed"):
                return False
    except Exception:  # the finalize message (and its retries) finishes the task instead
        logger.warning("inline finalize of task %s failed; sending it", task_id, exc_info=True)
        _request_finalize(task_id)
        return False
    from marketplace.audit.signals import request_chaining

    try:
        request_chaining()
    except Exception:  # the beat's periodic chaining picks the records up
        logger.warning("could not ask for the audit chaining after task %s", task_id, exc_info=True)
    return True


def _request_finalize(task_id: str) -> None:
    from marketplace.infra.celery_app import app

    try:
        app.send_task(names.FINALIZE, args=[task_id], queue=names.RESULTS_QUEUE, task_id=f"{task_id}:finalize:last")
    except Exception:  # recovery finishes the task instead
        logger.warning("could not ask for the finalize of task %s", task_id, exc_info=True)


def _stop_watch(task_id: str) -> Any:
    """A check, cheap to call often, of whether the task ended while this subtask runs (its end
    sets `lifecycle.STOP_KEY`): at most one Redis read per STOP_POLL_S."""
    state = {"at": 0.0, "stop": False}

    def stop_requested() -> bool:
        now = time.monotonic()
        if not state["stop"] and now - state["at"] >= STOP_POLL_S:
            state["at"] = now
            try:
                state["stop"] = lifecycle.stopped(task_id)
            except Exception:  # Redis away: run on; the task's end is seen at the outcome
                logger.debug("stop check for task %s failed", task_id, exc_info=True)
        return bool(state["stop"])

    return stop_requested


def _work_of(outcome: dict[str, Any]) -> lifecycle.Work:
    return lifecycle.Work(subtask_id=outcome["subtask_id"], task_id=outcome["task_id"], user_id=outcome["user_id"],
                          model=outcome["model"], device=outcome["device"], queue="", index=outcome["index"],
                          items=outcome["items"], inputs=[], params={}, attempts=0)


def _stopped(work: lifecycle.Work, hostname: str, reason: str, started: float) -> dict[str, Any]:
    seconds = round(time.perf_counter() - started, 6)
    logger.info("subtask %s stopped: %s", work.subtask_id, reason)
    recorded = lifecycle.stop(work, node=hostname, seconds=seconds, reason=reason)
    _after(work, recorded)
    return work.outcome(ok=False, stopped=True, error=reason, seconds=seconds)


def _failure(work: lifecycle.Work, hostname: str, error: str, started: float, *, retryable: bool
             ) -> dict[str, Any] | Retry:
    seconds = round(time.perf_counter() - started, 6)
    if retryable:
        logger.warning("subtask %s attempt failed, will retry: %s", work.subtask_id, error)
        lifecycle.retry(work.subtask_id, error=error)
        return Retry(error)
    logger.error("subtask %s failed: %s", work.subtask_id, error)
    recorded = lifecycle.fail(work, node=hostname, error=error, seconds=seconds)
    _after(work, recorded)
    return work.outcome(ok=False, error=error, seconds=seconds)
