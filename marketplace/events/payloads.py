"""Event payloads that the lifecycle's statements write in SQL, each defined once.

The statements that move a task or subtask write their outbox rows in the same statement
(one round trip on the hot path), so these payloads are SQL expressions over the moved row
(`s`: the subtask, `t`: its task). `jsonb_strip_nulls` leaves out what a status does not have
(a Done subtask has no error, a Failed one no result key): the Kafka codec skips absent fields.
"""
from __future__ import annotations


def subtask_completed(s: str = "s", t: str = "t") -> str:
    """`SubTaskCompleted`: a subtask reached a final status (Done, Failed or Cancelled)."""
    return f"""jsonb_strip_nulls(jsonb_build_object(
        'task_id', {s}.task_id::text, 'user_id', {t}.user_id::text, 'subtask_id', {s}.id::text,
        'index', {s}.index, 'status', {s}.status, 'items', {s}.items, 'seconds', {s}.seconds,
        'worker', {s}.worker, 'attempts', {s}.attempts, 'result_key', {s}.result_key,
        'result_sha256', {s}.result_sha256, 'error', {s}.error))"""


def task_assigned(t: str = "t", subtasks: str = "t.subtask_count") -> str:
    """`TaskAssigned`: a task was given its queue (scheduled, moved by recovery, re-sent)."""
    return f"""jsonb_build_object(
        'task_id', {t}.id::text, 'user_id', {t}.user_id::text, 'queue', {t}.queue,
        'subtasks', {subtasks}, 'priority', {t}.priority, 'dispatch_count', {t}.dispatch_count)"""


def task_started(t: str = "t") -> str:
    """`TaskStarted`: its first subtask was claimed (Scheduled -> InProgress). Read by the task's
    event streams; it has no Kafka message (`codec.LOCAL_EVENTS`)."""
    return f"""jsonb_build_object('task_id', {t}.id::text, 'user_id', {t}.user_id::text, 'started_at', {t}.started_at)"""


def insert_cte(name: str, *, type: str, key: str, payload: str, source: str, topic: str = ":topic") -> str:
    """A CTE `name` that writes one `type` event per row of `source` (its FROM clause)."""
    return f"""{name} AS (
        INSERT INTO outbox_events (topic, key, type, payload, created_at)
        SELECT {topic}, {key}, '{type}', {payload}, :now FROM {source}
        RETURNING id
    )"""
