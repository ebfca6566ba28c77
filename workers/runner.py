"""Execute one subtask: claim it, run the model, store the part, record the outcome.

The database row is the truth (`marketplace.tasks.lifecycle`): a redelivered subtask that
already finished returns its recorded outcome without running again, and its part key is
deterministic. After each outcome the node asks the fair dispatcher for more work if its
queue's broker list runs short, and the last subtask of a task finishes the task
(`marketplace.results.followup`).

One runner, two backends (`workers.backends`): an operator's node claims, stores and records
itself; a credentialed node asks the platform's NodeService for each of those steps and signs
its part.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from marketplace import observability
from marketplace.infra.storage import StorageError
from marketplace.registry.signals import incarnation
from marketplace.results.followup import INLINE_FINALIZE_MAX_SUBTASKS, INLINE_FINALIZE_SPAN, finish  # noqa: F401
from marketplace.results.service import encode_part
from marketplace.tasks import lifecycle
from workers import backends, node
from workers.executors import ExecContext, ExecutionError, Stopped, get_executor

logger = logging.getLogger(__name__)

# How often a running subtask looks whether its task ended (its node then stops it); a
# credentialed node asks the platform, less often.
STOP_POLL_S = 0.25
REMOTE_STOP_POLL_S = 1.0


@dataclass
class Retry:
    """Ask the Celery task to retry later."""

    error: str
    infrastructure: bool = False
    elsewhere: bool = False  # not for this node (verified results): back to the queue at once, for another
    queue: str | None = None  # where to send it back (it may have come by this node's own queue)


def execute(subtask_id: str, *, hostname: str, retries_left: bool, message_id: str | None = None
            ) -> dict[str, Any] | Retry:
    """Run a subtask to a final outcome dict, or return Retry."""
    backend = backends.current()
    try:
        early, work = backend.claim(subtask_id, hostname=hostname, message_id=message_id, incarnation=incarnation())
    except backends.Unreachable as exc:  # later (the message retries, with the infrastructure backoff)
        return Retry(str(exc), infrastructure=True)
    except backends.Elsewhere as exc:  # on another node: back to the shared queue at once, not after a backoff
        return Retry(str(exc), infrastructure=True, elsewhere=True)
    except backends.Refused as exc:  # a disabled node, a subtask not of its queues: nothing ran, nothing to retry
        logger.error("subtask %s refused to this node: %s", subtask_id, exc)
        return {"ok": False, "skipped": True, "refused": True, "subtask_id": subtask_id, "error": str(exc)}
    if early is not None or work is None:
        early = early or {}
        if early.pop("elsewhere", False):  # not for this node (verified results)
            return _elsewhere(backend, subtask_id, hostname, early)
        if early.pop("abandoned", False):  # it kept outliving its time limit: fail it, with the reason
            return _failure(backend, _work_of(early), hostname, early["error"], time.perf_counter(), retryable=False)
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
                          store=backend.store(), stop_requested=_stop_watch(backend, work.task_id))
        outputs = executor.run(work.inputs, work.params, ctx)
        if len(outputs) != work.items:
            raise ExecutionError(f"model returned {len(outputs)} outputs for {work.items} items")
        part = encode_part(outputs)
    except Stopped as exc:
        return _stopped(backend, work, hostname, str(exc), started)
    except ExecutionError as exc:
        return _failure(backend, work, hostname, str(exc), started, retryable=exc.retryable and retries_left)
    except Exception as exc:  # the model crashed: retry, then fail with the reason
        logger.exception("subtask %s crashed", subtask_id)
        return _failure(backend, work, hostname, f"{type(exc).__name__}: {exc}", started, retryable=retries_left)
    seconds = round(time.perf_counter() - started, 6)
    try:
        return backend.complete(work, hostname=hostname, part=part, seconds=seconds)
    except StorageError as exc:
        return _failure(backend, work, hostname, f"object store: {exc}", started, retryable=retries_left)
    except backends.Unreachable as exc:
        return Retry(str(exc), infrastructure=True)
    except backends.Refused as exc:  # the platform runs the subtask again elsewhere
        logger.error("subtask %s: part refused: %s", subtask_id, exc)
        return work.outcome(ok=False, skipped=True, refused=True, error=str(exc), seconds=seconds)


def _elsewhere(backend: Any, subtask_id: str, hostname: str, early: dict[str, Any]) -> dict[str, Any] | Retry:
    """A subtask this node may not run: straight to a node that may; a spot check that no other node
    can run is dropped; else back to the shared queue (a spot check before its batch's first run
    waits there for it)."""
    early_check = early.pop("early_check", False)
    target = None if early_check else backend.redirect(subtask_id, hostname=hostname)
    if target is not None:
        return {**early, "skipped": True, "redirected": target}
    if not (early_check and backend.others(subtask_id, hostname=hostname)) and backend.drop_check(
            subtask_id, reason=early["error"]):
        return {**early, "skipped": True, "dropped": True}
    if backend.give_up_if_short(subtask_id):  # fewer live nodes than its redundancy: its task failed, saying so
        return {**early, "skipped": True}
    return Retry(early["error"], infrastructure=True, elsewhere=True, queue=early.get("queue"))


def _stop_watch(backend: Any, task_id: str) -> Any:
    """A check, cheap to call often, of whether the task ended while this subtask runs (its end
    sets `lifecycle.STOP_KEY`): at most one read per STOP_POLL_S."""
    state = {"at": 0.0, "stop": False}
    every = REMOTE_STOP_POLL_S if backend.remote else STOP_POLL_S

    def stop_requested() -> bool:
        now = time.monotonic()
        if not state["stop"] and now - state["at"] >= every:
            state["at"] = now
            try:
                state["stop"] = backend.stopped(task_id)
            except Exception:  # Redis away: run on; the task's end is seen at the outcome
                logger.debug("stop check for task %s failed", task_id, exc_info=True)
        return bool(state["stop"])

    return stop_requested


def _work_of(outcome: dict[str, Any]) -> lifecycle.Work:
    return lifecycle.Work(subtask_id=outcome["subtask_id"], task_id=outcome["task_id"], user_id=outcome["user_id"],
                          model=outcome["model"], device=outcome["device"], queue="", index=outcome["index"],
                          items=outcome["items"], inputs=[], params={}, attempts=0)


def _stopped(backend: Any, work: lifecycle.Work, hostname: str, reason: str, started: float) -> dict[str, Any]:
    seconds = round(time.perf_counter() - started, 6)
    logger.info("subtask %s stopped: %s", work.subtask_id, reason)
    backend.stop(work, hostname=hostname, reason=reason, seconds=seconds)
    return work.outcome(ok=False, stopped=True, error=reason, seconds=seconds)


def _failure(backend: Any, work: lifecycle.Work, hostname: str, error: str, started: float, *, retryable: bool
             ) -> dict[str, Any] | Retry:
    seconds = round(time.perf_counter() - started, 6)
    if retryable:
        logger.warning("subtask %s attempt failed, will retry: %s", work.subtask_id, error)
        backend.retry(work, hostname=hostname, error=error)
        return Retry(error)
    logger.error("subtask %s failed: %s", work.subtask_id, error)
    backend.fail(work, hostname=hostname, error=error, seconds=seconds)
    return work.outcome(ok=False, error=error, seconds=seconds)
