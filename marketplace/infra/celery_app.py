"""The one Celery app, configured lazily from `celeryconfig.py`."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import celery
from celery.result import AsyncResult
from celery.signals import worker_process_init
from kombu.utils.objects import cached_property

from marketplace.infra import broker_transport

logger = logging.getLogger(__name__)
broker_transport.install()

# Task modules are listed by name: `marketplace` never imports `workers` directly.
TASK_MODULES = [
    "marketplace.scheduling.tasks",
    "marketplace.results.tasks",
    "marketplace.scheduling.recovery",
    "marketplace.webhooks.delivery",
    "workers.tasks",
    # Signal handlers: importing them connects them in every worker.
    "marketplace.registry.signals",
    "marketplace.audit.signals",
    "marketplace.audit.tasks",
    "marketplace.registry.tasks",
    "marketplace.events.tasks",
]

_batch_producer: ContextVar[Any] = ContextVar("marketplace_batch_producer", default=None)


class _Result(AsyncResult):  # type: ignore[misc]
    def then(self, callback: Any, on_error: Any = None, weak: bool = False) -> Any:
        if weak:
            # Only a group's ready barrier asks weakly, once per member, and nothing here waits on
            # one (chords count in the backend). Registering made the Redis backend SUBSCRIBE to
            # each subtask's result channel: a round trip per subtask, 4% of a fan-out's CPU.
            return self.on_ready.then(callback, on_error)
        return super().then(callback, on_error, weak)


class Celery(celery.Celery):
    """Celery's app, with two changes for publishing large chords (see `_Result`):
    publishes inside `batched_publishing()` share one buffered producer, and a group's
    members are not watched for a result nobody reads.

    Kept under Celery's own name: tools and checks that look for "a Celery app" see one.
    """

    amqp_cls = "marketplace.infra.broker_transport:AMQP"

    def producer_or_acquire(self, producer: Any = None) -> Any:
        return super().producer_or_acquire(producer or _batch_producer.get())

    @cached_property
    def AsyncResult(self) -> Any:  # noqa: N802 - Celery's name
        return self.subclass_with_self(_Result)


app = Celery("marketplace", include=TASK_MODULES)

app.config_from_object("celeryconfig")
# Logging, the node metrics exporter, tracing and our ids: connected wherever the app loads (beat too).
import marketplace.observability.celery  # noqa: E402,F401


@contextmanager
def batched_publishing(max_size: int = 1000) -> Iterator[None]:
    """Publish every message sent inside the block in pipelined batches (kombu's `Producer.batch`).

    Celery publishes a chord's header one message and one broker round trip at a time, and
    a chord gives no way to hand its group a producer: the app's `producer_or_acquire` does.
    Messages reach the broker when a batch fills or the block ends, and an error discards
    what was not yet sent, so a caller treats the block as one publish.
    """
    if _batch_producer.get() is not None:
        yield
        return
    with app.producer_or_acquire() as producer, producer.batch(max_size=max_size):
        token = _batch_producer.set(producer)
        try:
            yield
        finally:
            _batch_producer.reset(token)


@worker_process_init.connect
def _rebuild_clients(**_: Any) -> None:
    """Pools and clients do not survive fork(): every pool child builds its own."""
    from marketplace import observability
    from marketplace.infra import db, redis_client, storage
    from marketplace.settings import get_settings

    observability.init_worker_process()  # tracing first, so the new engine is instrumented
    if not get_settings().is_node:  # a credentialed node has no database (workers.backends)
        db.init_engine()
    storage.reset_store()
    redis_client.reset_redis()


def send_or_leave_to_recovery(task_name: str, message_id: str, send: Callable[[], Any], *, what: str) -> bool:
    """Publish a message that follows committed work (`send` publishes `task_name` as
    `message_id`); False when the broker is down, which is logged as `what` and left to the
    recovery sweep that re-sends it. The step whose work is committed must not fail on it:
    its caller would answer 503 for a task that exists, or retry a task already finished.
    Any other error still raises."""
    from marketplace.infra.errors import broker_unavailable
    from marketplace.observability.tracing import publish_scope

    try:
        with publish_scope(task_name, message_id):
            send()
    except Exception as exc:
        if not broker_unavailable(exc):
            raise
        logger.warning("%s not sent (%s: %s); the recovery sweep re-sends it", what, type(exc).__name__, exc)
        return False
    return True
