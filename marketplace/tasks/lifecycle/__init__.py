"""A task's and its subtasks' lifecycle: every status change goes through these doors.

    Task:     Created -> Scheduled -> InProgress -> Done | Failed | Cancelled
    SubTask:  Pending -> Running -> Done | Failed | Cancelled   (Running -> Pending to retry)

`moves` holds the one table of allowed moves (and which door makes each); the doors are

- `assign` / `assign_locked` (scheduler): Created -> Scheduled on a queue with live nodes; every
  subtask waits in the task's backlog for the fair dispatcher (`release`).
- `release` / `resend` (scheduler, recovery): subtasks are sent to the broker (no status change:
  a sent subtask is Pending until a node claims it).
- `claim`, `complete`, `retry`, `fail`, `stop` (nodes): a subtask's run, each outcome in one
  statement with its event, charge and audit records.
- `finish` (the results aggregator, for Done), `fail_task`, `cancel`: a task's end; what has not
  run is Cancelled, what runs is stopped by its node, billing is settled.

After-commit work (messages, revokes, webhooks) goes through `infra.after_commit.defer`.
"""
from marketplace.tasks.lifecycle.ends import (
    STOP_KEY,
    assign,
    assign_locked,
    cancel,
    emit_assigned,
    fail_task,
    finish,
    lock_task,
    send_webhook,
    stopped,
)
from marketplace.tasks.lifecycle.moves import SUBTASK_MOVES, TASK_MOVES, IllegalMove
from marketplace.tasks.lifecycle.release import release, resend
from marketplace.tasks.lifecycle.work import (
    RUNNING_MARGIN,
    Recorded,
    Work,
    claim,
    complete,
    drop_check,
    fail,
    outcome_record,
    retry,
    stop,
)

__all__ = [
    "RUNNING_MARGIN", "STOP_KEY", "SUBTASK_MOVES", "TASK_MOVES", "IllegalMove", "Recorded", "Work", "assign",
    "assign_locked", "cancel", "claim", "complete", "drop_check", "emit_assigned", "fail", "fail_task", "finish", "lock_task",
    "outcome_record", "release", "resend", "retry", "send_webhook", "stop", "stopped",
]
