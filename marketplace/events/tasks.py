"""Beat job: prune the outbox (runs whether or not a Kafka bridge is deployed)."""
from __future__ import annotations

from marketplace.events.relay import prune as prune_outbox
from marketplace.infra import names
from marketplace.infra.celery_app import app


@app.task(name=names.PRUNE_OUTBOX, acks_late=True)
def prune() -> int:
    return prune_outbox()
