"""Every subtask leaves `subtask.started` and `subtask.finished` records, tied to its task."""
from __future__ import annotations

from sqlalchemy import text

from tests.support.api import wait_for_task


def test_each_subtask_is_audited_from_start_to_finish(client, user):  # type: ignore[no-untyped-def]
    from marketplace.audit import service
    from marketplace.db import get_engine

    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": [1, 2, 3], "batch_size": 1},
                       headers=user["headers"])
    task_id = resp.get_json()["id"]
    assert wait_for_task(client, user["headers"], task_id)["status"] == "Done"
    service.chain_pending()
    with get_engine().connect() as conn:
        subtasks = {f"subtask:{r.id}" for r in conn.execute(text("SELECT id FROM subtasks WHERE task_id = :t"),
                                                             {"t": task_id})}
        rows = conn.execute(text("SELECT action, subject FROM audit_records WHERE task_id = :t"),
                            {"t": task_id}).all()
    started = {r.subject for r in rows if r.action == "subtask.started"}
    finished = {r.subject for r in rows if r.action == "subtask.finished"}
    assert started == subtasks and finished == subtasks, rows
