"""Consume `SubmitTask` records and create tasks exactly as REST `POST /v1/tasks` does.

- Same path: `tasks.service.submit_task` + commit, with the
  proto fields validated by the same `TaskRequest` model as REST and gRPC.
- Replays: the dedupe key is (user, idempotency_key). The task's own
  idempotency key makes `create_task` return the existing task, and a
  `processed_submissions` row written in the same transaction records that the
  record was handled (a race between two consumers ends on its unique key).
- A record that can never become a task (not a SubmitTask, no principal, bad
  token, unknown user, invalid fields, insufficient balance, quota, a reused
  key with a different body) goes to the DLQ as a `DeadLetter` with the reason.
- An outage (database, Redis, broker) is not the record's fault: the offset is
  not committed, the consumer seeks back and retries after a pause. Any other error
  would fail the same way every time: the record is dead-lettered with it.
- Offsets are committed only after the record was handled (task committed or
  dead letter delivered): at-least-once, made exactly-once by the dedupe key.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from marketplace.events.models import ProcessedSubmission
from marketplace.infra import errors
from marketplace.infra.db import new_session, utcnow
from marketplace.pb.kafka import messages_pb2 as pb

logger = logging.getLogger(__name__)
GROUP_ID = "marketplace.bridge"


class Rejected(Exception):
    """The record can never become a task; `reason` goes into the dead letter."""


@dataclass
class Outcome:
    status: str  # created | duplicate
    task_id: str


def _principal(session: Any, submit: pb.SubmitTask) -> uuid.UUID:
    from marketplace.rpc.calls import user_from_token
    from marketplace.users import service as users

    which = submit.WhichOneof("principal")
    if which == "api_token":
        return user_from_token(session, submit.api_token).id
    if which == "user_id":
        return users.get_user(session, user_id=submit.user_id).id
    raise Rejected("no principal: set api_token or user_id")


def handle_submission(value: bytes | None) -> Outcome:
    """Turn one record value into a task (or find the one it already made), in a span of its own:
    the task's `trace_id` follows the job from this record on, as a REST or gRPC submit's does."""
    from opentelemetry import trace

    with trace.get_tracer(__name__).start_as_current_span("kafka.submit"):
        return _handle_submission(value)


def _handle_submission(value: bytes | None) -> Outcome:
    from marketplace.rpc.tasks import task_request
    from marketplace.tasks import service as tasks

    if not value:
        raise Rejected("empty record value")
    try:
        submit = pb.SubmitTask.FromString(value)
    except DecodeError as exc:
        raise Rejected(f"not a SubmitTask protobuf: {exc}") from None
    if not submit.idempotency_key:
        raise Rejected("idempotency_key is required")
    session = new_session()
    try:
        try:
            # The key before any lookup by it (a NUL in it failed the query: taken for an outage,
            # the record was retried forever and its partition stood still).
            tasks.check_idempotency_key(submit.idempotency_key)
            user_id = _principal(session, submit)
            dedupe_key = f"{user_id}:{submit.idempotency_key}"
            request = task_request(submit)
            done = session.scalar(select(ProcessedSubmission).where(ProcessedSubmission.dedupe_key == dedupe_key))
            # A replay finds its task through the key; the same key with another body is a Conflict
            # (the shortcut on `done` answered "duplicate" and dropped the new body).
            task, created = tasks.submit_task(session, user_id=user_id, request=request,
                                              idempotency_key=submit.idempotency_key)
        except errors.Unavailable:
            raise
        except errors.MarketplaceError as exc:
            raise Rejected(f"{exc.title}: {exc.detail}") from None
        if done is None:
            session.add(ProcessedSubmission(dedupe_key=dedupe_key, task_id=str(task.id)))
        try:
            session.commit()  # a new task's schedule message goes once this commits
        except IntegrityError:  # another consumer handled the same submission first
            session.rollback()
            return Outcome("duplicate", str(task.id))
        # A replay of a task still Created (a crash between its commit and the offset's left it
        # to recovery's sweep): scheduling is idempotent under the row lock.
        if not created and task.status == "Created":
            tasks.schedule_accepted(task.id, task.model)
        return Outcome("created" if created else "duplicate", str(task.id))
    finally:
        session.close()


def dead_letter(msg: Any, reason: str, *, payload: bool = True) -> bytes:
    letter = pb.DeadLetter(payload=(msg.value() or b"") if payload else b"", key=msg.key() or b"", reason=reason,
                           source_topic=msg.topic() or "", partition=msg.partition(), offset=msg.offset())
    letter.occurred_at.FromDatetime(utcnow())
    return letter.SerializeToString()


class SubmissionConsumer:
    """Reads `topic_submissions`; `poll_once()` handles at most one record."""

    def __init__(self, *, bootstrap: str, topic: str | None = None, dlq_topic: str | None = None,
                 group_id: str = GROUP_ID, producer: Any = None, retry_backoff: float = 2.0,
                 **consumer_extra: Any) -> None:
        from confluent_kafka import Consumer, Producer

        from marketplace.events.relay import producer_config
        from marketplace.settings import get_settings

        settings = get_settings()
        self.topic = topic or settings.topic_submissions
        self.dlq_topic = dlq_topic or settings.topic_submissions_dlq
        self.retry_backoff = retry_backoff
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": group_id, "enable.auto.commit": False,
            "auto.offset.reset": "earliest", **consumer_extra,
        })
        self.consumer.subscribe([self.topic])
        self.producer = producer or Producer(producer_config(bootstrap))

    def poll_once(self, timeout: float = 1.0) -> str | None:
        """Handle one record: 'created', 'duplicate', 'dead-lettered', 'retry', or None if none came."""
        from confluent_kafka import TopicPartition

        msg = self.consumer.poll(timeout)
        if msg is None:
            return None
        if msg.error():
            logger.warning("submissions: consumer error: %s", msg.error())
            return None
        try:
            outcome = handle_submission(msg.value())
            logger.info("submissions: %s task %s (offset %d)", outcome.status, outcome.task_id, msg.offset())
            result = outcome.status
        except Rejected as exc:
            logger.warning("submissions: offset %d rejected: %s", msg.offset(), exc)
            if not self._send_dead_letter(msg, str(exc)):
                return self._retry(msg, TopicPartition)
            result = "dead-lettered"
        except Exception as exc:
            from marketplace.infra.errors import unavailable_dependency

            if isinstance(exc, errors.Unavailable) or unavailable_dependency(exc):  # an outage: try it again
                logger.warning("submissions: %s; retrying offset %d", exc, msg.offset())
                return self._retry(msg, TopicPartition)
            # Anything else fails the same way every time: retried, it stopped its partition for
            # good. The dead letter keeps the record, with the error, for an operator to replay.
            logger.exception("submissions: unexpected error at offset %d; dead-lettering it", msg.offset())
            if not self._send_dead_letter(msg, f"internal error: {type(exc).__name__}: {exc}"[:2000]):
                return self._retry(msg, TopicPartition)
            result = "dead-lettered"
        self.consumer.commit(message=msg, asynchronous=False)
        return result

    def _retry(self, msg: Any, tp_cls: Any) -> str:
        self.consumer.seek(tp_cls(msg.topic(), msg.partition(), msg.offset()))
        import time

        time.sleep(self.retry_backoff)
        return "retry"

    def _send_dead_letter(self, msg: Any, reason: str) -> bool:
        """Deliver the dead letter; False (the record is retried, not committed past) if it was not."""
        from confluent_kafka import KafkaException

        delivered: list[Any] = []
        headers = [("reason", reason.encode()[:1000]), ("source_topic", msg.topic().encode())]
        try:
            self.producer.produce(self.dlq_topic, key=msg.key(), value=dead_letter(msg, reason), headers=headers,
                                  on_delivery=lambda err, _m: delivered.append(err))
        except KafkaException as exc:  # too large with the payload: the letter without it, saying so
            size = len(msg.value() or b"")
            logger.warning("submissions: dead letter of offset %d refused (%s); sending it without its "
                           "%d-byte payload", msg.offset(), exc, size)
            reason = f"{reason} (payload of {size} bytes left out of this letter: {exc})"
            try:
                self.producer.produce(self.dlq_topic, key=msg.key(), value=dead_letter(msg, reason, payload=False),
                                      headers=headers, on_delivery=lambda err, _m: delivered.append(err))
            except KafkaException as again:
                logger.warning("submissions: dead letter of offset %d not sent: %s", msg.offset(), again)
                return False
        self.producer.flush(30)
        if not delivered or delivered[0] is not None:
            logger.warning("submissions: dead letter not delivered: %s", delivered[0] if delivered else "timeout")
            return False
        return True

    def run(self, stop: Any) -> None:
        while not stop.is_set():
            try:
                self.poll_once(1.0)
            except Exception as exc:  # the loop outlives any single failure
                logger.exception("submissions: poll failed: %s", exc)
                stop.wait(self.retry_backoff)

    def close(self) -> None:
        self.consumer.close()
        self.producer.flush(5)
