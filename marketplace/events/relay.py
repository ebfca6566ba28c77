"""Relay the transactional outbox to Kafka, in id order, at least once.

Leadership: one batch at a time across all bridges. Each batch runs in a DB
transaction that first takes `pg_try_advisory_xact_lock(RELAY_LOCK)`; a
bridge that does not get it skips the round. `FOR UPDATE SKIP LOCKED` would let
two bridges send disjoint batches concurrently and so reorder one task's
events across batches; the advisory lock keeps a single sender, and because
the lock is per transaction a crashed or partitioned leader loses it with its
connection and another bridge takes over on its next round.

Delivery: rows are produced with the idempotent producer (`acks=all`) keyed by
task id (one partition per task, murmur2 as the Java client does), and marked
sent only after their delivery report succeeded. If a row fails, later rows
with the same key are not marked either, so the next round re-sends them after
it (order per task kept; consumers drop the duplicates by `event_id`). Kafka
down: every report fails after `message.timeout.ms`, nothing is marked, the
rows wait in the outbox and the next round tries again.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select, text, update
from sqlalchemy.orm import Session

from marketplace.events import codec
from marketplace.events.models import OutboxEvent
from marketplace.infra.db import new_session, utcnow

logger = logging.getLogger(__name__)
RELAY_LOCK = 0x6D6B7462  # "mktb": the advisory lock id of the outbox relay


def producer_config(bootstrap: str, *, delivery_timeout: float = 30.0, **extra: Any) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "partitioner": "murmur2_random",
        "linger.ms": 5,
        "message.timeout.ms": int(delivery_timeout * 1000),
        **extra,
    }


@dataclass
class BatchReport:
    leader: bool = True
    sent: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # rows with no Kafka message type

    @property
    def count(self) -> int:
        return len(self.sent) + len(self.failed) + len(self.skipped)


class Relay:
    """Moves unsent outbox rows to Kafka. `run_batch()` is one round; `run()` loops."""

    def __init__(self, *, bootstrap: str, batch_size: int = 500, delivery_timeout: float = 30.0,
                 idle_interval: float = 0.5, producer: Any = None, **producer_extra: Any) -> None:
        from confluent_kafka import Producer

        self.batch_size = batch_size
        self.delivery_timeout = delivery_timeout
        self.idle_interval = idle_interval
        self.producer = producer or Producer(
            producer_config(bootstrap, delivery_timeout=delivery_timeout, **producer_extra)
        )

    def run_batch(self) -> BatchReport:
        session = new_session()
        try:
            if not session.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": RELAY_LOCK}):
                return BatchReport(leader=False)
            rows = list(session.scalars(
                select(OutboxEvent).where(OutboxEvent.sent_at.is_(None)).order_by(OutboxEvent.id)
                .limit(self.batch_size)
            ))
            report = self._send(rows)
            done = report.sent + report.skipped
            if done:
                session.execute(update(OutboxEvent).where(OutboxEvent.id.in_(done)).values(sent_at=utcnow()))
            session.commit()
            return report
        finally:
            session.close()

    def _send(self, rows: list[OutboxEvent]) -> BatchReport:
        report = BatchReport()
        outcome: dict[int, str | None] = {}

        def on_delivery(row_id: int) -> Any:
            def _cb(err: Any, _msg: Any) -> None:
                outcome[row_id] = None if err is None else str(err)
            return _cb

        for row in rows:
            if row.type in codec.LOCAL_EVENTS:
                report.skipped.append(row.id)
                continue
            try:
                value, headers = codec.encode(event_id=row.id, type=row.type, key=row.key, payload=row.payload,
                                              created_at=row.created_at)
            except (codec.UnknownEvent, ValueError, TypeError) as exc:
                logger.error("outbox: row %d (%s) cannot be encoded, skipping it: %s", row.id, row.type, exc)
                report.skipped.append(row.id)
                continue
            while True:
                try:
                    self.producer.produce(row.topic, key=row.key.encode(), value=value, headers=headers,
                                          on_delivery=on_delivery(row.id))
                    break
                except BufferError:  # local queue full: let deliveries drain
                    self.producer.poll(0.1)
        if rows:
            left = self.producer.flush(self.delivery_timeout + 5)
            if left:
                logger.warning("outbox: %d record(s) still undelivered after the flush timeout", left)
        blocked: set[str] = set()
        for row in rows:
            if row.id in report.skipped:
                continue
            err = outcome.get(row.id, "no delivery report")
            if err is None and row.key not in blocked:
                report.sent.append(row.id)
            else:
                blocked.add(row.key)  # later events of this task wait for this one
                report.failed.append(row.id)
        if report.failed:
            first = next(r for r in rows if r.id == report.failed[0])
            logger.warning("outbox: %d of %d event(s) not delivered (first: %s); they stay in the outbox",
                           len(report.failed), len(rows), outcome.get(first.id, "no delivery report"))
        return report

    def run(self, stop: Any, *, error_backoff: float = 2.0) -> None:
        """Relay until `stop` (a threading.Event) is set."""
        while not stop.is_set():
            try:
                report = self.run_batch()
            except Exception as exc:  # a DB blip must not end the bridge; the rows are safe in the outbox
                logger.warning("outbox relay round failed: %s", exc)
                stop.wait(error_backoff)
                continue
            if report.failed:
                stop.wait(error_backoff)
            elif report.count < self.batch_size:
                stop.wait(self.idle_interval)

    def close(self) -> None:
        self.producer.flush(5)


def prune_outbox(session: Session, *, older_than: timedelta, include_unsent: bool = False,
                 batch: int = 10_000) -> int:
    """Delete relayed rows older than `older_than` (and unsent ones too when Kafka is off)."""
    cutoff = utcnow() - older_than
    deleted = 0
    while True:
        cond = [OutboxEvent.created_at < cutoff]
        if not include_unsent:
            cond.append(OutboxEvent.sent_at.is_not(None))
        ids = select(OutboxEvent.id).where(*cond).order_by(OutboxEvent.id).limit(batch).scalar_subquery()
        n = session.execute(delete(OutboxEvent).where(OutboxEvent.id.in_(ids))).rowcount or 0
        deleted += n
        if n < batch:
            return deleted


def prune(*, retention_hours: float | None = None, include_unsent: bool | None = None) -> int:
    """Prune by the configured retention; with no Kafka configured, unsent rows age out too.
    A bridge passes `include_unsent=False`: it relays them, whatever this process's settings say
    (`bridge --bootstrap-servers` without the setting deleted rows it had yet to send)."""
    from marketplace.infra.db import session_scope
    from marketplace.settings import get_settings

    settings = get_settings()
    hours = settings.outbox_retention_hours if retention_hours is None else retention_hours
    if include_unsent is None:
        include_unsent = not settings.kafka_bootstrap_servers
    with session_scope() as session:
        n = prune_outbox(session, older_than=timedelta(hours=hours), include_unsent=include_unsent)
    if n:
        logger.info("outbox: pruned %d event(s) older than %gh", n, hours)
    return n


def wait_idle(relay: Relay, *, timeout: float = 30.0) -> None:
    """Run rounds until a round finds nothing to send (tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report = relay.run_batch()
        if report.leader and report.count == 0:
            return
        if report.failed:
            time.sleep(0.5)
    raise TimeoutError("the outbox did not drain")
