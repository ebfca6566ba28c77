"""Monitoring in every process: Prometheus metrics, OpenTelemetry traces, JSON logs.

Metrics: one exporter per node, multiprocess inside it
    Celery workers are prefork: the pool children run the tasks and update
    the counters, but Prometheus scrapes one address per node. We use
    prometheus-client's multiprocess mode *per node*: the worker's main process
    (signal `worker_init`, before the pool forks) creates a fresh directory,
    switches metric values to files in it, and serves `/metrics` on
    `MARKETPLACE_METRICS_PORT` (default 9808, 0 disables) from a thread; every
    pool child writes its own file, a scrape sums them (`MultiProcessCollector`),
    so a replaced child's counts are kept and no child needs a port of its own.
    The alternative, one exporter per pool child, would need a port per child
    and Prometheus service discovery for each, and lose counts whenever a child
    is replaced. The API is the same shape: `marketplace api` makes a fresh
    `PROMETHEUS_MULTIPROC_DIR` before it execs gunicorn, every gunicorn worker
    writes files, any of them answers `/metrics` with the aggregate, and
    `child_exit` marks dead workers (api/gunicorn_conf.py). Without a
    multiprocess dir (tests, `flask run`) the values stay in memory.
    Gauges of shared state (queue depth from the broker's Redis lists, live
    workers from the registry, audit chain length and the last verification)
    are computed at scrape time by `metrics.StateCollector`, not kept in files.
Traces: `tracing.init_tracing` in every process (pool children: in
    `worker_process_init`); context crosses Celery in message headers.
Logs: `logs.setup_logging` at each process entry point; our ids in contextvars.
"""
from __future__ import annotations

import logging
from typing import Any

from marketplace.observability.logs import bind, bound, clear, current_ids, setup_logging

logger = logging.getLogger(__name__)

__all__ = [
    "bind", "bound", "clear", "current_ids", "setup_logging", "init_app", "init_process",
    "init_worker_process", "task_submitted", "task_started", "task_finished",
]


def init_process(service: str | None = None, *, logging_: bool = True) -> None:
    """Entry point of a long-running process (CLI commands): JSON logs and tracing."""
    if logging_:
        setup_logging()
    from marketplace.observability import tracing

    tracing.init_tracing(f"marketplace-{service}" if service else None)


def init_worker_process() -> None:
    """In each Celery pool child, before it rebuilds its engines (so SQLAlchemy is traced)."""
    from marketplace.observability import tracing

    tracing.init_tracing("marketplace-worker")


def task_submitted(*, model: str, task_id: Any, user_id: Any) -> None:
    """A task was accepted: count it and tie the rest of this request's log lines to it."""
    from marketplace.observability import metrics

    metrics.task_submitted(model=model)
    bind(task_id=task_id, user_id=user_id)


def task_started(*, model: str, queue: str, waited: float) -> None:
    """A task's first subtask started, `waited` seconds after the task was submitted."""
    from marketplace.observability import metrics

    metrics.task_started(queue=queue or model, waited=waited)


def task_finished(*, model: str, status: str, cost: Any = None) -> None:
    from marketplace.observability import metrics

    metrics.task_finished(model=model, status=status, cost=cost)


def init_app(app: Any, settings: Any = None) -> None:
    """Flask: request metrics (prometheus-flask-exporter), `/metrics` without auth, request traces, ids."""
    from flask import Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_flask_exporter import PrometheusMetrics

    from marketplace.observability import metrics, tracing

    tracing.init_tracing("marketplace-api")
    tracing.instrument_flask(app)
    flask_registry = CollectorRegistry(auto_describe=True)
    # group_by="endpoint": a label per view, not per URL (task ids would explode the series count).
    exporter = PrometheusMetrics(app, path=None, registry=flask_registry, group_by="endpoint", defaults_prefix="flask")
    app.extensions["marketplace.metrics"] = exporter

    def prometheus_metrics() -> Response:
        body = generate_latest(metrics.exposition_registry(flask_registry))
        return Response(body, content_type=CONTENT_TYPE_LATEST)  # mimetype= appended a second charset

    app.add_url_rule("/metrics", "metrics", prometheus_metrics, methods=["GET"])

    @app.before_request
    def _fresh_ids() -> None:  # threads serve many requests: no id may leak into the next one
        clear()
