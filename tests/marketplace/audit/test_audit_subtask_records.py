"""Every subtask leaves `subtask.started` and `subtask.finished` records, tied to its task."""
from __future__ import annotations

from sqlalchemy import text

from tests.support.api import wait_for_task


def test_each_subtask_is_audited_from_start_to_finish(client, user):  # type: ignore[no-untyped-def]
    from marketplace.audit import service
    from marketplace.infra.db import get_engine

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


def test_a_submit_names_its_scheduling_message_and_a_re_publish_is_recorded(client, user):  # type: ignore[no-untyped-def]
    import marketplace.audit.signals  # noqa: F401  (connects the publish handler here, as in every worker)
    from marketplace.audit import service
    from marketplace.infra.db import get_engine
    from marketplace.tasks.service import enqueue_schedule, schedule_message_id

    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": [1]}, headers=user["headers"])
    task_id = resp.get_json()["id"]
    assert wait_for_task(client, user["headers"], task_id)["status"] == "Done"
    enqueue_schedule(task_id)  # what recovery does: a message the submit's record does not name
    service.chain_pending()
    with get_engine().connect() as conn:
        rows = conn.execute(text("SELECT action, data FROM audit_records WHERE task_id = :t ORDER BY seq"),
                            {"t": task_id}).all()
    created = [r for r in rows if r.action == "task.created"]
    assert len(created) == 1 and f'"schedule_id":"{schedule_message_id(task_id)}"' in created[0].data, rows
    # The submit's own message is not recorded twice; the re-publish is recorded by the publish signal.
    assert [r.action for r in rows].count("task.schedule_requested") == 1, rows


def _done_two_subtask_job(client, user) -> tuple[str, list[str]]:  # type: ignore[no-untyped-def]
    """A Done echo job of two subtasks: its id and its subtasks' ids, in index order."""
    from marketplace.infra.db import get_engine

    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": [1, 2], "batch_size": 1},
                       headers=user["headers"])
    task_id = resp.get_json()["id"]
    assert wait_for_task(client, user["headers"], task_id)["status"] == "Done"
    with get_engine().connect() as conn:
        ids = [str(r.id) for r in conn.execute(text("SELECT id FROM subtasks WHERE task_id = :t ORDER BY index"),
                                               {"t": task_id})]
    return task_id, ids


def test_a_dispatch_from_outside_a_task_is_recorded_with_its_task(client, user):  # type: ignore[no-untyped-def]
    """`marketplace recover` re-sends subtasks from a plain process: no task_postrun flushes the
    publish hook's buffer there, so the dispatch itself writes its `task.dispatched` record."""
    import json

    import marketplace.audit.signals  # noqa: F401  (connects the publish handler here, as in every worker)
    from marketplace.audit import service
    from marketplace.infra.db import get_engine
    from marketplace.scheduling.dispatch import publish

    task_id, ids = _done_two_subtask_job(client, user)
    # Done subtasks sent again run as no-ops (their rows are final) and the task stays Done.
    publish(task_id, [f"{i}:7" for i in ids], queue="cpu.generic", time_limit=60)
    service.chain_pending()
    with get_engine().connect() as conn:
        records = [json.loads(r.data) for r in conn.execute(
            text("SELECT data FROM audit_records WHERE task_id = :t AND action = 'task.dispatched' ORDER BY seq"),
            {"t": task_id})]
    assert records == [{"subtasks": 2, "queues": ["cpu.generic"]}] * 2, records


def test_a_dispatch_record_is_one_statement_that_commits_by_itself_and_a_re_publish_finds_its_task(client, user):  # type: ignore[no-untyped-def]
    """The dispatch names its task: its record is one INSERT in autocommit (a transaction was
    BEGIN, INSERT and COMMIT). A subtask published with no task known (a retry's re-publish)
    takes the transaction that looks its task up."""
    import json

    from sqlalchemy import event

    from marketplace.audit import signals
    from marketplace.infra.db import get_engine
    from marketplace.scheduling.dispatch import publish

    task_id, ids = _done_two_subtask_job(client, user)
    seen: list[tuple[str, bool]] = []

    def spy(conn, _cursor, statement, *_args):  # type: ignore[no-untyped-def]
        seen.append((statement.split("(")[0].strip(), conn.connection.dbapi_connection.autocommit))

    event.listen(get_engine(), "before_cursor_execute", spy)
    try:
        publish(task_id, [f"{i}:8" for i in ids], queue="cpu.generic", time_limit=60)
        signals._buffer().append((ids[0], "cpu.generic", None))
        signals.flush_published()
    finally:
        event.remove(get_engine(), "before_cursor_execute", spy)
    writes = [entry for entry in seen if entry[0].startswith("EXECUTE mp_audit_pending")]
    assert writes == [("EXECUTE mp_audit_pending", True), ("EXECUTE mp_audit_pending", False)], seen
    with get_engine().connect() as conn:
        records = [(r.task_id, json.loads(r.data)) for r in conn.execute(  # chained by now, or not yet
            text("SELECT ts, task_id, data FROM audit_pending WHERE subject = :s AND action = 'task.dispatched' "
                 "UNION ALL SELECT ts, task_id, data FROM audit_records WHERE subject = :s "
                 "AND action = 'task.dispatched' ORDER BY ts"), {"s": f"task:{task_id}"})]
    assert records[-2:] == [(task_id, {"subtasks": 2, "queues": ["cpu.generic"]}),
                            (task_id, {"subtasks": 1, "queues": ["cpu.generic"]})], records
