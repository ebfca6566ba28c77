"""Outbox rows ↔ Kafka records: each value is a `marketplace.kafka.v1.Envelope`.

Every record the bridge publishes carries one Envelope (so a consumer of a
topic with several event types decodes any record the same way), the key is
the task id, and the header `type` names the inner message (`TaskCreated`,
...). `event_id` is the outbox row id: unique and increasing, so consumers
deduplicate the redeliveries that at-least-once relaying can produce.

The payloads written by `marketplace.events.outbox.emit` are plain dicts
whose keys mostly match the proto fields; `ALIASES` maps the few that differ.
`TaskCancelled` rows travel as `TaskFailed` with `status = "Cancelled"`.
"""
from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from marketplace.pb.kafka import messages_pb2 as pb

# outbox type -> (Envelope oneof field, message class)
EVENTS: dict[str, tuple[str, type[Message]]] = {
    "TaskCreated": ("task_created", pb.TaskCreated),
    "TaskAssigned": ("task_assigned", pb.TaskAssigned),
    "SubTaskCompleted": ("subtask_completed", pb.SubTaskCompleted),
    "TaskCompleted": ("task_completed", pb.TaskCompleted),
    "TaskFailed": ("task_failed", pb.TaskFailed),
    "TaskCancelled": ("task_failed", pb.TaskFailed),
    "AuditEvent": ("audit_event", pb.AuditEvent),
    "AuditCheckpoint": ("audit_checkpoint", pb.AuditCheckpoint),
    "SubTaskVerified": ("subtask_verified", pb.SubTaskVerified),
}

# Outbox types for the task event streams only (`GET /v1/tasks/<id>/events`): the relay marks
# them sent without a Kafka record.
LOCAL_EVENTS = frozenset({"TaskStarted"})

# proto field -> payload keys tried after the field's own name
ALIASES: dict[str, tuple[str, ...]] = {
    "total_items": ("items",),
    "subtask_count": ("subtasks",),
    "data_json": ("data",),
    "result_key": ("key",),
    "result_sha256": ("sha256",),
    "trace_id": ("trace",),
}


class UnknownEvent(ValueError):
    """An outbox row whose type has no Kafka message."""


def _value(payload: dict[str, Any], name: str) -> Any:
    for key in (name, *ALIASES.get(name, ())):
        if payload.get(key) is not None:
            return payload[key]
    return None


def _convert(fd: FieldDescriptor, value: Any) -> Any:
    if fd.type == FieldDescriptor.TYPE_STRING:
        if isinstance(value, dict | list):
            return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return str(value)
    if fd.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
                   FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64):
        return int(value)
    if fd.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return float(value)
    if fd.type == FieldDescriptor.TYPE_BOOL:
        return bool(value)
    return value


def to_message(*, event_id: int, type: str, key: str, payload: dict[str, Any], created_at: datetime) -> Message:
    """The event message (TaskCreated, ...) for one outbox row."""
    if type not in EVENTS:
        raise UnknownEvent(f"outbox event type {type!r} has no Kafka message")
    _, cls = EVENTS[type]
    msg = cls()
    for fd in cls.DESCRIPTOR.fields:
        if fd.name in ("event_id", "occurred_at"):
            continue
        value = _value(payload, fd.name)
        if value is None:
            continue
        if fd.is_repeated:
            getattr(msg, fd.name).extend(_convert(fd, v) for v in value)
            continue
        setattr(msg, fd.name, _convert(fd, value))
    msg.event_id = event_id
    msg.occurred_at.FromDatetime(created_at)
    if "task_id" in cls.DESCRIPTOR.fields_by_name and not msg.task_id and type != "AuditEvent":
        msg.task_id = key
    if type == "TaskCancelled" and not msg.status:
        msg.status = "Cancelled"
    if type == "AuditEvent":
        _audit_fields(msg, payload)
    return msg


def _audit_fields(msg: Any, payload: dict[str, Any]) -> None:
    """An audit record's own time (the hash covers it, not when it was chained: a consumer can
    check the hash again) and the user it is about (its data's, else its actor's)."""
    ts = payload.get("ts")
    if isinstance(ts, str):
        msg.occurred_at.FromDatetime(datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC))
    data = payload.get("data")
    user = data.get("user_id") if isinstance(data, dict) else None
    actor = str(payload.get("actor") or "")
    if not user and actor.startswith("user:"):
        user = actor[len("user:"):]
    if user and not msg.user_id:
        msg.user_id = str(user)


def encode(*, event_id: int, type: str, key: str, payload: dict[str, Any],
           created_at: datetime) -> tuple[bytes, list[tuple[str, bytes]]]:
    """(Envelope bytes, Kafka headers) for one outbox row."""
    msg = to_message(event_id=event_id, type=type, key=key, payload=payload, created_at=created_at)
    envelope = pb.Envelope()
    getattr(envelope, EVENTS[type][0]).CopyFrom(msg)
    headers = [("type", msg.DESCRIPTOR.name.encode()), ("event_id", str(event_id).encode())]
    return envelope.SerializeToString(), headers


def decode(value: bytes) -> Message:
    """The inner event of a published record (TaskCreated, TaskAssigned, ...)."""
    envelope = pb.Envelope.FromString(value)
    which = envelope.WhichOneof("event")
    if which is None:
        raise ValueError("empty Envelope")
    return getattr(envelope, which)
