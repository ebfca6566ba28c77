"""Node lifecycle: register on worker_ready, heartbeat from a thread, deregister on shutdown."""
from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from marketplace.catalog import get_catalog
from marketplace.settings import get_settings

logger = logging.getLogger(__name__)
_stop = threading.Event()
_info: dict[str, Any] = {}


def node_info(consumer: Any) -> dict[str, Any]:
    queues = sorted(consumer.app.amqp.queues.consume_from.keys())
    catalog = get_catalog()
    models = sorted({m for q in queues for m in catalog.models_for_queue(q)})
    concurrency = getattr(getattr(consumer, "pool", None), "limit", None) or getattr(
        consumer.controller, "concurrency", 1
    )
    return {
        "hostname": consumer.hostname,
        "queues": queues,
        "models": models,
        "concurrency": int(concurrency or 1),
        "pid": os.getpid(),
        "facts": {"cpu_count": os.cpu_count()},
    }


def _beat_forever() -> None:
    from marketplace.redis_client import get_redis
    from marketplace.registry.service import heartbeat

    interval = get_settings().heartbeat_interval
    while not _stop.is_set():
        try:
            heartbeat(get_redis(), info=_info)
        except Exception as exc:  # Redis blips must not kill the heartbeat thread
            logger.warning("registry: heartbeat failed: %s", exc)
        _stop.wait(interval)


@worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    _info.update(node_info(sender))
    _stop.clear()
    threading.Thread(target=_beat_forever, name="marketplace-heartbeat", daemon=True).start()
    logger.info("registry: node %s online for %s", _info["hostname"], ",".join(_info["queues"]))


@worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    _stop.set()
    if not _info:
        return
    from marketplace.redis_client import get_redis
    from marketplace.registry.service import deregister

    try:
        deregister(get_redis(), hostname=_info["hostname"])
    except Exception as exc:
        logger.warning("registry: could not deregister %s: %s", _info.get("hostname"), exc)
