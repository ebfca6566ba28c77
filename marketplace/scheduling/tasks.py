"""Celery entry points of the scheduler (queue `marketplace.scheduler`)."""
from __future__ import annotations

import logging

from sqlalchemy.exc import DBAPIError

from marketplace.infra import names
from marketplace.infra.celery_app import app
from marketplace.infra.errors import database_unavailable
from marketplace.scheduling import dispatch, service
from marketplace.settings import get_settings

logger = logging.getLogger(__name__)
MAX_SCHEDULE_DELAY = 10.0  # a waiting task notices a new node within this many seconds


def retry_delay(retries: int, base: float) -> float:
    """Exponential backoff from `base`, capped at MAX_SCHEDULE_DELAY."""
    return min(MAX_SCHEDULE_DELAY, base * (2 ** min(retries, 6)))


@app.task(name=names.SCHEDULE, bind=True, max_retries=None, acks_late=True)
def schedule(self, task_id: str, model: str | None = None) -> dict:  # type: ignore[no-untyped-def]
    try:
        outcome = service.schedule_task(task_id, model=model)
    except DBAPIError as exc:
        if not database_unavailable(exc):
            raise
        # Database down: keep the task's scheduling alive; it is bounded by the schedule timeout.
        logger.warning("schedule %s: database unavailable, retrying: %s", task_id, exc.orig)
        raise self.retry(countdown=MAX_SCHEDULE_DELAY) from None
    if outcome.status == "waiting":
        raise self.retry(countdown=retry_delay(self.request.retries, get_settings().schedule_retry_delay))
    logger.info("schedule %s: %s %s", task_id, outcome.status, outcome.queue or outcome.reason or "")
    return {"status": outcome.status, "queue": outcome.queue, "released": outcome.released}


@app.task(name=names.WAKE, acks_late=True, ignore_result=True)
def wake(queues: list[str], models: list[str], hostname: str | None = None) -> dict:
    """A node for `queues` came online: send again what a predecessor under its name (`hostname`)
    left Running (`orphans.take_over`), try its waiting tasks now, once each, and release what its
    slots can start. One attempt, no retry chain of its own: each waiting task already has its
    `schedule` retry pending, so this only shortens the wait."""
    if hostname:
        from marketplace.scheduling.orphans import take_over

        taken = take_over(hostname=hostname)
        if taken:
            logger.warning("wake: %s restarted; its predecessor's subtasks sent again for %d task(s)", hostname,
                           len(taken))
    _clear_stranded()
    scheduled = []
    for task_id in service.waiting_tasks(models=models):
        outcome = service.schedule_task(task_id)
        if outcome.status == "scheduled":
            scheduled.append(task_id)
    released = {q: dispatch.release_queue(q, wait=False) for q in queues}
    if scheduled or any(released.values()):
        logger.info("wake for %s: scheduled %d waiting task(s), released %s", ",".join(queues), len(scheduled),
                    released)
    return {"scheduled": scheduled, "released": released}


@app.task(name=names.RELEASE, acks_late=True, ignore_result=True)
def release() -> dict:
    """Beat: release on every queue with a backlog (what node triggers missed, a cap freed up)."""
    return dispatch.release_all()


def _clear_stranded() -> None:
    """Dispatched tasks flagged as waiting for a node (`stranded`) whose queue this node serves:
    their reason goes now, not at the next recovery sweep."""
    from marketplace.infra.db import session_scope
    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import live_workers
    from marketplace.scheduling import stranded

    with session_scope() as session:
        cleared = stranded.clear_served(session, workers=live_workers(get_redis()))
    if cleared:
        logger.info("wake: %d stranded task(s) served again", len(cleared))


@app.task(name=names.LOST_RUN, acks_late=True, ignore_result=True, autoretry_for=(DBAPIError,),
          retry_backoff=1, retry_backoff_max=30, max_retries=60)
def lost_run(celery_id: str) -> str:
    """Errback of every subtask message: its run was killed at the hard time limit (scheduling/lost.py)."""
    from marketplace.scheduling import lost

    outcome = lost.lost_run(celery_id)
    logger.info("lost run %s: %s", celery_id, outcome)
    return outcome
