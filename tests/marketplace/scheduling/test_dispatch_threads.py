"""A release goes through the marketplace's Celery app from whichever thread sends it."""
from __future__ import annotations

import json
import threading
import uuid

from tests.support.env import private_broker


def test_a_publish_from_another_thread_goes_through_the_marketplace_app(stack):  # type: ignore[no-untyped-def]
    """gRPC runs `Reschedule` on its own threads. There an unbound signature took Celery's fallback
    app, configured on its own: the stock producer, not ours, and, after a switch of broker, the
    broker it first read: the messages went where no node of this broker would see them."""
    from marketplace.infra.broker import broker_lists
    from marketplace.infra.celery_app import app
    from marketplace.infra.redis_client import get_redis
    from marketplace.scheduling.dispatch import publish

    sent = f"{uuid.uuid4()}:1"
    errors: list[BaseException] = []

    def send() -> None:
        try:
            publish(str(uuid.uuid4()), [sent], queue="cpu.generic", time_limit=60)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    with private_broker():  # no node consumes what is sent
        thread = threading.Thread(target=send)
        thread.start()
        thread.join(timeout=60)
        ids = [(json.loads(raw).get("headers") or {}).get("id")
               for name in broker_lists("cpu.generic", dict(app.conf.broker_transport_options))
               for raw in get_redis().lrange(name, 0, -1)]
    assert not errors, errors
    assert sent in ids, "the message went to another app's broker"
