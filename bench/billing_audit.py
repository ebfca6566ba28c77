"""What billing and audit add to a subtask's outcome: the completion statement with its charge and
audit records (what runs) against the same statement without them (a variant built here only).

A subtask's charge and its audit records are written by the very statement that records its
outcome (`marketplace/tasks/lifecycle/statements.py`: `COMPLETE`), so there is no switch to turn
them off in the product; this bench builds the bare statement from the same fragments (the
outcome's row, its event and the user's use of the queue) and runs both on claimed subtasks of a
real task, interleaved, in this process (no broker, no worker: the statement's own cost). Then
it times chaining the buffered audit records (off the subtask's path: beat and each task's end
do it in the product).

    .venv/bin/python bench/billing_audit.py [--n 2000]
"""
from __future__ import annotations

import argparse
import statistics
import time
import uuid

from harness import api_client, new_user, stack


def _bare() -> object:
    """COMPLETE without its charge and audit records: the outcome, its event, the queue's use."""
    from marketplace.events import payloads
    from marketplace.infra.prepared import Prepared
    from marketplace.tasks.lifecycle import statements as sql

    return Prepared("bench_complete_bare", f"""
        WITH s AS (
            UPDATE subtasks SET status = 'Done', result_key = :key, result_sha256 = :sha, error = NULL,
                   seconds = :seconds, finished_at = :now
            WHERE id = :id AND status = 'Running'
            RETURNING *
        ), {sql._TASK},
        {payloads.insert_cte("e", type="SubTaskCompleted", key="s.task_id::text",
                             payload=payloads.subtask_completed(), source="s, t")},
        {sql._USE}
        SELECT t.subtask_count, s.task_id FROM s, t
    """, types={"id": "uuid", "seconds": "float8", "topic": "text", "key": "text", "sha": "text",
                "now": "timestamptz"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    with stack():
        from marketplace.events.outbox import topic_for
        from marketplace.infra.db import autocommit, session_scope, utcnow
        from marketplace.tasks import lifecycle
        from marketplace.tasks.schemas import TaskRequest
        from marketplace.tasks.service import create_task

        client = api_client()
        new_user(client)
        me = client.get("/v1/me", headers=new_user(client)).get_json()
        with session_scope() as session:
            task, _ = create_task(session, user_id=uuid.UUID(me["id"]),
                                  request=TaskRequest(model="echo", inputs=list(range(args.n)), batch_size=1))
            session.execute(__import__("sqlalchemy").text(
                "UPDATE tasks SET status = 'Scheduled', queue = 'cpu.generic' WHERE id = :t"), {"t": task.id})
            ids = [str(i) for (i,) in session.execute(__import__("sqlalchemy").text(
                "SELECT id FROM subtasks WHERE task_id = :t ORDER BY index"), {"t": task.id})]
        works = [lifecycle.claim(sid, node="bench@test", message_id=f"{sid}:1")[1] for sid in ids]
        bare = _bare()
        full_times, bare_times = [], []
        with autocommit() as conn:
            for i, work in enumerate(works):
                start = time.perf_counter()
                if i % 2:
                    bare.execute(conn, {"id": uuid.UUID(work.subtask_id), "seconds": 0.001, "key": "k", "sha": "s",
                                        "now": utcnow(), "topic": topic_for("SubTaskCompleted")})
                    bare_times.append(time.perf_counter() - start)
                else:
                    lifecycle.complete(work, node="bench@test", key="k", sha256="s", seconds=0.001)
                    full_times.append(time.perf_counter() - start)
        from marketplace.audit.service import chain_pending

        start = time.perf_counter()
        chained = chain_pending()
        chain_s = time.perf_counter() - start
        full, plain = statistics.median(full_times) * 1000, statistics.median(bare_times) * 1000
        print(f"completion statement, median of {len(full_times)} each (this process, PostgreSQL on the same 2 cores):")
        print(f"  with charge + audit records  {full:.3f} ms")
        print(f"  without (bench-only variant) {plain:.3f} ms")
        print(f"  billing + audit add          {full - plain:.3f} ms per subtask ({full / plain:.2f}x the statement)")
        print(f"chaining the {chained} buffered audit records afterwards: {chain_s:.2f} s "
              f"({chain_s / max(chained, 1) * 1000:.3f} ms per record, off the subtask's path)")


if __name__ == "__main__":
    main()
