"""Celery signal handlers: logging, the node's metrics exporter, tracing in pool children, our ids.

Imported by `marketplace.celery_app`, so they are connected in every process
that loads the app (workers, beat, and publishers such as the API). Nothing
here runs at import time besides connecting receivers.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery.signals import (
    before_task_publish,
    celeryd_init,
    setup_logging,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_shutdown,
    worker_shutdown,
)

from marketplace.infra import names
from marketplace.observability import logs

logger = logging.getLogger(__name__)
SUBTASK_TASK = names.RUN_SUBTASK
# Our ids ride along in message headers; they appear as attributes of `task.request`.
HEADER = {"task_id": "marketplace_task_id", "user_id": "marketplace_user_id"}
_TASK_ID_ARG = {names.SCHEDULE, names.FINALIZE, names.DELIVER_WEBHOOK}
_started: dict[str, tuple[float, list[Any]]] = {}


# Celery's own line per task run, "received" (the worker's main process) and "succeeded in" (its
# pool process), are DEBUG for these tasks: a job's subtasks and the fair dispatcher's releases
# are recorded in the database, its events and /metrics, and a fan-out of 1,000 subtasks wrote
# 2,000 JSON lines at INFO (~7% of a pool process's time). Their failures and retries still log.
QUIET_TASKS = frozenset({names.RUN_SUBTASK, names.RELEASE})
_PER_TASK_LOGGERS = ("celery.app.trace", "celery.worker.strategy")


class PerTaskLinesAtDebug(logging.Filter):
    """Drop Celery's INFO line about a run of a QUIET_TASKS task unless the logger shows DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        from celery.app.trace import LOG_RECEIVED, LOG_SUCCESS

        if record.msg not in (LOG_RECEIVED, LOG_SUCCESS) or not isinstance(record.args, dict):
            return True
        if record.args.get("name") not in QUIET_TASKS:
            return True
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def quiet_per_task_lines() -> None:
    for name in _PER_TASK_LOGGERS:
        target = logging.getLogger(name)
        if not any(isinstance(f, PerTaskLinesAtDebug) for f in target.filters):
            target.addFilter(PerTaskLinesAtDebug())


@setup_logging.connect
def _setup_logging(loglevel: Any = None, **_: Any) -> None:
    """Celery leaves logging to us when this signal has a receiver (workers and beat)."""
    from marketplace.settings import get_settings

    logs.setup_logging(level=get_settings().log_level.upper())
    quiet_per_task_lines()


@celeryd_init.connect
def _early_logging(instance: Any = None, **_: Any) -> None:
    """Log JSON from the first line: startup warnings included, the ASCII banner replaced by one line."""
    from marketplace.settings import get_settings

    logs.setup_logging(level=get_settings().log_level.upper())
    quiet_per_task_lines()
    if instance is not None and get_settings().log_json:
        instance.quiet = True
        import celery.apps.worker

        # The shutdown notices ("worker: Warm shutdown") are written straight to stderr otherwise.
        celery.apps.worker.safe_say = _say  # type: ignore[attr-defined]


def _say(msg: str, f: Any = None) -> None:
    logging.getLogger("celery.apps.worker").warning(msg.strip())


@worker_init.connect
def _start_node_exporter(sender: Any = None, **_: Any) -> None:
    """In the worker's main process, before the pool forks: file-backed metrics + the node's /metrics."""
    from marketplace.observability import metrics
    from marketplace.settings import get_settings

    settings = get_settings()
    try:
        queues = sorted(sender.app.amqp.queues.consume_from)
    except AttributeError:
        queues = []
    logger.info("worker %s starting", getattr(sender, "hostname", "?"),
                extra={"queues": ",".join(queues), "concurrency": getattr(sender, "concurrency", None)})
    if not settings.metrics_port or type(sender).__name__ == "TestWorkController":  # in-process test workers
        return
    pool = sender.pool_cls if isinstance(sender.pool_cls, str) else getattr(sender.pool_cls, "__module__", "")
    if "prefork" in pool or "processes" in pool:  # solo/threads pools run tasks in this very process
        metrics.enable_multiprocess(metrics.new_multiprocess_dir("marketplace-worker-"))
    metrics.start_exporter(settings.metrics_port, settings.metrics_host)


@worker_shutdown.connect
def _remove_metric_files(**_: Any) -> None:
    from marketplace.observability import metrics

    metrics.remove_multiprocess_dir()


@worker_process_shutdown.connect
def _child_exit(pid: int | None = None, **_: Any) -> None:
    from marketplace.observability import metrics, tracing

    tracing.flush()
    metrics.mark_process_dead(pid or os.getpid())


@before_task_publish.connect
def _ids_to_headers(headers: dict[str, Any] | None = None, **_: Any) -> None:
    if headers is None:
        return
    ids = logs.current_ids()
    for name, header in HEADER.items():
        if ids.get(name) and header not in headers:
            headers[header] = ids[name]


@task_prerun.connect
def _bind_ids(task_id: str | None = None, task: Any = None, args: Any = None, **_: Any) -> None:
    request = getattr(task, "request", None)
    name = getattr(task, "name", "")
    ours = {k: getattr(request, h, None) for k, h in HEADER.items()}
    if name in _TASK_ID_ARG and args:
        ours["task_id"] = args[0]
    if name == SUBTASK_TASK and args:
        ours["subtask_id"] = args[0]
    logs.clear()
    logs.bind(**ours)
    if name == SUBTASK_TASK and task_id:
        _started[task_id] = (time.perf_counter(), [])


@task_postrun.connect
def _unbind_and_count(task_id: str | None = None, task: Any = None, retval: Any = None, state: str | None = None,
                      **_: Any) -> None:
    try:
        if getattr(task, "name", "") == SUBTASK_TASK and task_id in _started:
            started, _ = _started.pop(task_id)
            _count_subtask(task, retval, state, time.perf_counter() - started)
    finally:
        logs.clear()


def _count_subtask(task: Any, retval: Any, state: str | None, seconds: float) -> None:
    from marketplace.observability import metrics

    delivery = getattr(task.request, "delivery_info", None) or {}
    queue = delivery.get("routing_key") or "unknown"
    if state == "RETRY":
        outcome = "retry"
    elif not isinstance(retval, dict):
        outcome = "error"
    elif retval.get("skipped"):
        outcome = "skipped"
    elif retval.get("duplicate"):
        outcome = "duplicate"
    else:
        outcome = "done" if retval.get("ok") else "failed"
    metrics.subtask_ran(queue=queue, outcome=outcome, seconds=None if outcome in ("skipped", "duplicate") else seconds)
