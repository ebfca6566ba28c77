"""Every status a task or subtask may move to, from each status, and the door that moves it.

The one table of the lifecycle. The doors (`marketplace.tasks.lifecycle`) build their SQL
conditions from it (`sources`), ORM paths check a move with `check`, and the architecture
document's table is this one (a test compares them).
"""
from __future__ import annotations

from marketplace.tasks.models import SubTaskStatus, TaskStatus

T, S = TaskStatus, SubTaskStatus

# (from, to) -> the door that makes the move
TASK_MOVES: dict[tuple[TaskStatus, TaskStatus], str] = {
    (T.CREATED, T.SCHEDULED): "assign",       # a live queue serves its model
    (T.CREATED, T.FAILED): "fail_task",       # no node came within the schedule timeout
    (T.CREATED, T.CANCELLED): "cancel",
    (T.CREATED, T.IN_PROGRESS): "claim",      # a node outside Celery saved a part first (gRPC SavePartial)
    (T.SCHEDULED, T.IN_PROGRESS): "claim",    # its first subtask starts
    (T.SCHEDULED, T.FAILED): "fail_task",     # its queue lost every node for the schedule timeout
    (T.SCHEDULED, T.CANCELLED): "cancel",
    (T.IN_PROGRESS, T.DONE): "finish",        # every subtask Done: the parts joined
    (T.IN_PROGRESS, T.FAILED): "fail",        # a subtask failed for good
    (T.IN_PROGRESS, T.CANCELLED): "cancel",
}

SUBTASK_MOVES: dict[tuple[SubTaskStatus, SubTaskStatus], str] = {
    (S.PENDING, S.RUNNING): "claim",          # a node takes its message
    (S.RUNNING, S.RUNNING): "claim",          # a copy re-sent by recovery takes over from a dead node
    (S.RUNNING, S.DONE): "complete",
    (S.RUNNING, S.PENDING): "retry",          # a retryable error, or a run killed at its hard limit
    (S.RUNNING, S.FAILED): "fail",            # out of retries, or an error no retry mends
    (S.RUNNING, S.CANCELLED): "stop",         # its task ended while it ran: the run was stopped
    (S.PENDING, S.CANCELLED): "finish",       # its task ended before it ran (also `drop_check`: a spot
                                              # check no other node can run)
}


class IllegalMove(RuntimeError):
    """A door was asked for a move the table does not allow (a bug, not a user error)."""


def check(kind: str, old: str, new: str) -> None:
    """Raise IllegalMove unless `kind` ("task" or "subtask") may go from `old` to `new`."""
    table, enum = (TASK_MOVES, TaskStatus) if kind == "task" else (SUBTASK_MOVES, SubTaskStatus)
    if (enum(old), enum(new)) not in table:  # type: ignore[arg-type]
        raise IllegalMove(f"a {kind} cannot move from {old} to {new}")


def sources(kind: str, new: str | TaskStatus | SubTaskStatus) -> tuple[str, ...]:
    """The statuses a `kind` may move to `new` from, for a statement's WHERE (sorted)."""
    table = TASK_MOVES if kind == "task" else SUBTASK_MOVES
    return tuple(sorted(old.value for (old, to) in table if to.value == str(getattr(new, "value", new))))


def sql_in(values: tuple[str, ...]) -> str:
    """`('A', 'B')` for a statement: statuses are this module's constants, never user input."""
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"
