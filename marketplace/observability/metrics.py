"""Prometheus metrics: counters updated where things happen, gauges computed at scrape time.

Counters and histograms (`marketplace_tasks_submitted_total`, ...) live in
`REGISTRY`. In a multi-process server they are file-backed (prometheus-client
multiprocess mode, see the package docstring) and an exposition registry made
by `exposition_registry()` aggregates the files; gauges that describe shared
state (queue depth, live workers, audit chain) are read from Redis/PostgreSQL
by `StateCollector` whenever Prometheus scrapes, so every exporter reports the
same truth and none has to be kept up to date.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import text

logger = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
TASKS_SUBMITTED = Counter(
    "marketplace_tasks_submitted", "Tasks accepted, by model.", ["model"], registry=REGISTRY
)
TASKS_FINISHED = Counter(
    "marketplace_tasks_finished", "Tasks that reached a final status (Done, Failed, Cancelled).",
    ["model", "status"], registry=REGISTRY,
)
SUBTASK_DURATION = Histogram(
    "marketplace_subtask_duration_seconds", "Wall time of one subtask run on a worker, by queue.", ["queue"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
    registry=REGISTRY,
)
SUBTASKS = Counter(
    "marketplace_subtasks", "Subtask runs by queue and outcome (done, failed, retry, skipped, duplicate, error).",
    ["queue", "outcome"], registry=REGISTRY,
)
TASK_WAIT = Histogram(
    "marketplace_task_wait_seconds", "Seconds from a task's submit to its first subtask's start, by queue.",
    ["queue"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600), registry=REGISTRY,
)
CREDITS_CHARGED = Counter(
    "marketplace_credits_charged", "Credits charged for finished tasks, by model.", ["model"], registry=REGISTRY
)

AUDIT_VERIFY_KEY = "marketplace:audit:verification"


# -- recording (one call from each service) ----------------------------------------


def task_submitted(*, model: str) -> None:
    TASKS_SUBMITTED.labels(model=model).inc()


def task_finished(*, model: str, status: str, cost: Decimal | float | None = None) -> None:
    TASKS_FINISHED.labels(model=model, status=status).inc()
    if cost:
        CREDITS_CHARGED.labels(model=model).inc(float(cost))


def task_started(*, queue: str, waited: float) -> None:
    TASK_WAIT.labels(queue=queue).observe(max(0.0, waited))


def subtask_ran(*, queue: str, outcome: str, seconds: float | None) -> None:
    # Duration first: a scrape that sees the run counted then sees its duration too.
    if seconds is not None:
        SUBTASK_DURATION.labels(queue=queue).observe(seconds)
    SUBTASKS.labels(queue=queue, outcome=outcome).inc()


def record_audit_verification(*, valid: bool, length: int | None = None, head: str | None = None) -> None:
    """Store the periodic audit verification result for `marketplace_audit_chain_valid` (any exporter)."""
    from marketplace.infra.redis_client import get_redis

    doc = {"valid": bool(valid), "length": length, "head": head, "ts": time.time()}
    get_redis().set(AUDIT_VERIFY_KEY, json.dumps(doc))


# -- scrape-time gauges -------------------------------------------------------------


def known_queues() -> list[str]:
    from marketplace.catalog import CONTROL_QUEUES, get_catalog

    return list(dict.fromkeys([*CONTROL_QUEUES, *get_catalog().queues]))


class StateCollector(Collector):
    """Gauges read at scrape time: queue depth, live workers, audit chain length and validity."""

    def collect(self) -> Iterator[Metric]:
        queues = known_queues()
        yield from self._queue_depth(queues)
        yield from self._subtasks(queues)
        yield from self._workers_live(queues)
        yield from self._audit()

    def _queue_depth(self, queues: list[str]) -> Iterable[Metric]:
        from marketplace.infra.broker import queue_depths

        family = GaugeMetricFamily("marketplace_queue_depth", "Messages waiting in the broker, by queue.",
                                   labels=["queue"])
        try:
            for queue, depth in queue_depths(queues).items():
                family.add_metric([queue], depth)
        except Exception as exc:  # a scrape must answer even when the broker is down
            logger.warning("metrics: queue depth unavailable: %s", exc)
            return []
        return [family]

    def _subtasks(self, queues: list[str]) -> Iterable[Metric]:
        """Subtasks not started and running, per queue: what autoscaling reads (KEDA,
        `deploy/k8s`). Not started: waiting in the database for the fair dispatcher, sent and
        waiting in the broker, and those of tasks still waiting for a live node (`Created`, no
        queue yet: the scheduler gives a task a queue only once a node serves it). The last are
        counted on every queue the task may use (`device: any`: the GPU and the CPU queue), so a
        queue scaled to zero nodes sees the work that waits for it and scales up; whichever
        queue's node comes first takes it."""

        from marketplace.catalog import get_catalog
        from marketplace.infra.db import get_engine

        queued = GaugeMetricFamily("marketplace_subtasks_queued",
                                   "Subtasks waiting to start (in the database, the broker, or for a live node), "
                                   "by queue.", labels=["queue"])
        running = GaugeMetricFamily("marketplace_subtasks_running", "Subtasks running on a node, by queue.",
                                    labels=["queue"])
        counts = {q: [0, 0] for q in queues if not q.startswith("marketplace.")}
        try:
            with get_engine().connect() as conn:
                for queue, n in conn.execute(_BACKLOG_BY_QUEUE):
                    counts.setdefault(queue, [0, 0])[0] += int(n or 0)
                for queue, waiting, run in conn.execute(_IN_FLIGHT_BY_QUEUE):
                    counts.setdefault(queue, [0, 0])[0] += int(waiting)
                    counts[queue][1] += int(run)
                catalog = get_catalog()
                for model, device, n in conn.execute(_WAITING_FOR_A_NODE):
                    spec = catalog.get(model)
                    for queue in spec.candidate_queues(device) if spec else []:
                        counts.setdefault(queue, [0, 0])[0] += int(n or 0)
        except Exception as exc:
            logger.warning("metrics: subtask counts unavailable: %s", exc)
            return []
        for queue, (q, r) in sorted(counts.items()):
            queued.add_metric([queue], q)
            running.add_metric([queue], r)
        return [queued, running]

    def _workers_live(self, queues: list[str]) -> Iterable[Metric]:
        from marketplace.infra.redis_client import get_redis
        from marketplace.registry.service import live_workers

        family = GaugeMetricFamily("marketplace_workers_live", "Live worker nodes consuming each queue.",
                                   labels=["queue"])
        try:
            counts = dict.fromkeys(queues, 0)
            for node in live_workers(get_redis()):
                for queue in node.get("queues", []):
                    counts[queue] = counts.get(queue, 0) + 1
        except Exception as exc:
            logger.warning("metrics: worker registry unavailable: %s", exc)
            return []
        for queue, n in counts.items():
            family.add_metric([queue], n)
        return [family]

    def _audit(self) -> Iterable[Metric]:
        from sqlalchemy import text

        from marketplace.infra.db import get_engine
        from marketplace.infra.redis_client import get_redis

        out: list[Metric] = []
        try:
            with get_engine().connect() as conn:
                length = conn.execute(text("SELECT coalesce(max(seq), 0) FROM audit_records")).scalar()
            out.append(GaugeMetricFamily("marketplace_audit_chain_length", "Audit records in the hash chain.",
                                         value=float(length or 0)))
        except Exception as exc:
            logger.warning("metrics: audit chain length unavailable: %s", exc)
        try:
            raw = get_redis().get(AUDIT_VERIFY_KEY)
            if raw:  # absent until the first verification ran (the AuditVerificationMissing alert)
                doc = json.loads(raw)
                out.append(GaugeMetricFamily(
                    "marketplace_audit_chain_valid", "1 if the last periodic audit chain verification passed.",
                    value=1.0 if doc.get("valid") else 0.0,
                ))
        except Exception as exc:
            logger.warning("metrics: audit verification result unavailable: %s", exc)
        return out


_ACTIVE = "status IN ('Scheduled', 'InProgress')"
_BACKLOG_BY_QUEUE = text(f"SELECT queue, sum(backlog) FROM tasks WHERE backlog > 0 AND {_ACTIVE} GROUP BY queue")
_IN_FLIGHT_BY_QUEUE = text("""
    SELECT t.queue, count(*) FILTER (WHERE s.status = 'Pending'), count(*) FILTER (WHERE s.status = 'Running')
    FROM tasks t JOIN subtasks s ON s.task_id = t.id
    WHERE t.status IN ('Scheduled', 'InProgress') AND (s.status = 'Running' OR (s.status = 'Pending' AND s.dispatches > 0))
    GROUP BY t.queue
""")
# Tasks the scheduler has not given a queue: no live node serves them yet (or their `schedule`
# message is on its way). All their subtasks wait.
_WAITING_FOR_A_NODE = text("SELECT model, device, sum(subtask_count) FROM tasks WHERE status = 'Created' "
                           "GROUP BY model, device")
STATE = StateCollector()


# -- multiprocess mode and exposition ---------------------------------------------

_multiproc_dir: Path | None = None
_owned_dir = False


def multiprocess_dir() -> Path | None:
    """The directory this process writes its metric files to, if in multiprocess mode."""
    if _multiproc_dir is not None:
        return _multiproc_dir
    from marketplace.settings import get_settings

    configured = get_settings().prometheus_multiproc_dir
    if configured is not None and getattr(values.ValueClass, "_multiprocess", False):
        return configured
    return None


def new_multiprocess_dir(prefix: str) -> Path:
    """A fresh, empty directory for one server's metric files (under the configured parent, if any)."""
    from marketplace.settings import get_settings

    parent = get_settings().prometheus_multiproc_dir
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=str(parent) if parent else None))


def prepare_server_multiprocess_dir(prefix: str) -> Path:
    """For a server about to exec (gunicorn): the configured dir emptied of old files, else a fresh one."""
    from marketplace.settings import get_settings

    configured = get_settings().prometheus_multiproc_dir
    if configured is None:
        return new_multiprocess_dir(prefix)
    configured.mkdir(parents=True, exist_ok=True)
    for old in configured.glob("*.db"):  # counts of a previous run must not leak into this one
        old.unlink(missing_ok=True)
    return configured


def enable_multiprocess(path: Path) -> None:
    """Switch this process (and the children it forks later) to file-backed metric values."""
    global _multiproc_dir, _owned_dir
    # prometheus-client reads the directory from the environment when a value file opens.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    values.ValueClass = values.MultiProcessValue()
    _multiproc_dir = path
    _owned_dir = True


def remove_multiprocess_dir() -> None:
    if _multiproc_dir is not None and _owned_dir:
        shutil.rmtree(_multiproc_dir, ignore_errors=True)


def mark_process_dead(pid: int) -> None:
    """Drop a dead child's live-gauge files (counters and histograms keep their totals)."""
    path = multiprocess_dir()
    if path is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(path))


class _Union(Collector):
    def __init__(self, *registries: CollectorRegistry) -> None:
        self.registries = registries

    def collect(self) -> Iterator[Metric]:
        for registry in self.registries:
            yield from registry.collect()


def exposition_registry(*extra: CollectorRegistry) -> CollectorRegistry:
    """What `/metrics` shows: our counters (from every process's files in multiprocess mode) + state gauges."""
    registry = CollectorRegistry()
    path = multiprocess_dir()
    if path is not None:
        from prometheus_client.multiprocess import MultiProcessCollector

        MultiProcessCollector(registry, path=str(path))
    else:
        registry.register(_Union(REGISTRY, *extra))
    registry.register(STATE)
    return registry


def serve_process_metrics(what: str) -> None:
    """`/metrics` of a single-process server (`marketplace grpc`, `marketplace bridge`) on
    MARKETPLACE_METRICS_PORT (0: none): the tasks it accepts are counted there, as the API's
    are on its own port, or a throughput panel misses every gRPC and Kafka submission."""
    from marketplace.settings import get_settings

    settings = get_settings()
    port = settings.metrics_port
    if port and start_exporter(port, settings.metrics_host) is None:
        logger.warning("metrics: %s runs without /metrics (port %s is taken)", what, port)


def start_exporter(port: int, host: str) -> Any | None:
    """Serve `/metrics` for this node on host:port from a thread; None (and a warning) if it cannot bind."""
    from prometheus_client import start_http_server

    class _Fresh(Collector):  # build the aggregate per scrape: children come and go
        def collect(self) -> Iterator[Metric]:
            yield from exposition_registry().collect()

    registry = CollectorRegistry()
    registry.register(_Fresh())
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        logger.warning("metrics: cannot serve /metrics on %s:%s: %s", host, port, exc)
        return None
    logger.info("metrics: serving /metrics on %s:%s", host, port)
    return server
