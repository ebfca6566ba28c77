"""A big submit the balance cannot cover is refused before its rows are built, and never waits on
the user's balance lock; a covered one takes that lock only once its rows are in (issue 31, item 6:
200,000 one-item subtasks took 15 s to be refused, and 3 of 8 such refusals were 503s)."""
from __future__ import annotations

import json
import threading
import uuid
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select, text

from tests.support.accounts import set_user
from tests.support.sql import statements_of
from tests.support.wait import wait_until

# 200,000 one-item echo subtasks. Echo's price card (config/models.yaml): each subtask may run
# 60 s at 0.0001 a second after a 0.0001 start fee, 0.0061, and each item costs 0.000001:
# 200,000 x 0.0061 + 200,000 x 0.000001 = 1220.2.
BIG_JOB = json.dumps({"model": "echo", "inputs": [1] * 200_000, "batch_size": 1})
BIG_ESTIMATE = "1220.200000"


def _submit(client, user: dict[str, Any]):  # type: ignore[no-untyped-def]
    return client.post("/v1/tasks", data=BIG_JOB, content_type="application/json", headers=user["headers"])


def _tasks_of(user_id: str) -> int:
    from marketplace.infra.db import session_scope
    from marketplace.tasks.models import Task

    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(Task).where(Task.user_id == uuid.UUID(user_id)))


def _assert_refused(resp) -> None:  # type: ignore[no-untyped-def]
    assert resp.status_code == 402, (resp.status_code, resp.get_json())
    body = resp.get_json()
    assert body["balance"] == "1.000000" and body["estimate"] == BIG_ESTIMATE, body
    assert "balance" in body["detail"] and BIG_ESTIMATE in body["detail"], body


def test_an_unfunded_big_submit_is_refused_before_a_row_is_built(client, user):  # type: ignore[no-untyped-def]
    set_user(user["id"], balance=Decimal("1"))
    resp, statements = statements_of(lambda: _submit(client, user))
    _assert_refused(resp)
    # What the refusal sent: the request's user, then one read of the balance and the quota sums.
    # It used to insert the task and its 200,000 subtasks (and lock the balance) first, and roll back.
    assert not [s for s in statements if any(w in s.upper() for w in ("INSERT", "UPDATE", "DELETE"))], statements
    executed = [s.split()[1].split("(")[0] for s in statements if s.startswith("EXECUTE ")]
    assert executed == ["mp_hold_check"], statements
    assert _tasks_of(user["id"]) == 0


def test_unfunded_big_submits_never_wait_on_the_balance_lock(app, client, user):  # type: ignore[no-untyped-def]
    """Eight at once from one user, while another transaction holds the user's balance lock as a
    covered submit does while it places its hold: all 402. They used to queue on that lock (each
    refusal holding it through its own insert) and the last ones were 503s at the statement timeout."""
    from marketplace.infra.db import get_engine

    set_user(user["id"], balance=Decimal("1"))
    answers: list[tuple[int, Any]] = []

    def submit() -> None:
        resp = _submit(app.test_client(), user)
        answers.append((resp.status_code, resp.get_json()))

    threads = [threading.Thread(target=submit) for _ in range(8)]
    with get_engine().connect() as holder:
        holder.execute(text("SELECT balance FROM users WHERE id = :id FOR NO KEY UPDATE"), {"id": user["id"]})
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)  # a refusal that waits on the lock ends at the statement timeout (30 s)
        holder.rollback()
    assert len(answers) == 8, answers
    assert [status for status, _ in answers] == [402] * 8, answers
    assert all(body["estimate"] == BIG_ESTIMATE for _, body in answers), answers
    assert _tasks_of(user["id"]) == 0


def _subtasks_bytes() -> int:
    """The subtasks table's size on disk: it grows as rows go in, committed or not."""
    from marketplace.infra.db import get_engine

    with get_engine().connect() as conn:
        return conn.execute(text("SELECT pg_relation_size('subtasks')")).scalar_one()


def test_a_big_covered_submit_locks_the_balance_only_after_its_rows_are_in(app, client, user):  # type: ignore[no-untyped-def]
    """While its 200,000 subtask rows go in (seconds), the user's balance row is free: the user's
    other submits, top-ups and settlements do not wait on it. It was locked first and held through
    the insert."""
    from sqlalchemy.exc import OperationalError

    from marketplace.infra.db import get_engine

    set_user(user["id"], balance=Decimal("5000"), daily_spend_limit=Decimal("5000"))
    before = _subtasks_bytes()
    answer: dict[str, Any] = {}
    submit = threading.Thread(target=lambda: answer.update(resp=_submit(app.test_client(), user)))
    submit.start()
    try:
        # Some 4 MB of its ~23 MB of subtask rows in (the statement's start, parsing its 200,000
        # batches, comes before the lock it took first: too early to look).
        wait_until(lambda: _subtasks_bytes() > before + 4 * 2**20, timeout=60,
                   what="the submit's subtask rows going in", interval=0.01)
        with get_engine().connect() as conn:
            try:
                conn.execute(text("SELECT balance FROM users WHERE id = :id FOR NO KEY UPDATE NOWAIT"),
                             {"id": user["id"]})
                locked_by_the_insert = False
            except OperationalError as exc:  # lock_not_available
                locked_by_the_insert = getattr(exc.orig, "pgcode", None) == "55P03"
                if not locked_by_the_insert:
                    raise
            conn.rollback()
    finally:
        submit.join(timeout=120)
    resp = answer["resp"]
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json()["estimated_cost"] == BIG_ESTIMATE
    # Not left to a worker the session may have started: 200,000 subtasks.
    assert client.post(f"/v1/tasks/{resp.get_json()['id']}/cancel", headers=user["headers"]).status_code == 202
    assert not locked_by_the_insert, "the balance was locked while the submit's rows were being inserted"
