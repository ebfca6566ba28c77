"""Finalize on real Postgres and the test object store: what it reads, and what it writes."""
from __future__ import annotations

import json

from tests.support.api import register
from tests.support.progress import claimed, ran, stored_task
from tests.support.sql import statements_of


def test_finalize_locks_the_task_and_reads_its_parts_in_one_statement(client):  # type: ignore[no-untyped-def]
    from marketplace.infra.storage import get_store
    from marketplace.results.service import finalize_task, result_key

    user = register(client)
    task_id, _ = ran(user["id"], ["a", {"b": 2}, 3])
    outcome, statements = statements_of(lambda: finalize_task(task_id))
    assert outcome == "done"
    statements = [s for s in statements if not s.startswith("PREPARE ")]  # a connection's first use of each
    assert statements[1].startswith("EXECUTE mp_lock_hold"), statements  # settlement's first step
    assert "FOR UPDATE OF tasks" in statements[0] and "subtasks" in statements[0]
    # Its TaskCompleted event and its audit records (the settlement's, the task's) in one statement, at commit.
    writes = [s.split("(")[0] for s in statements if s.startswith(("EXECUTE mp_emit", "EXECUTE mp_audit_pending"))]
    assert writes == ["EXECUTE mp_audit_pending_events"]
    document = json.loads(get_store().get_bytes(result_key(task_id)))
    assert document["outputs"] == ["a", {"b": 2}, 3]


def test_finalize_waits_for_a_subtask_that_is_not_final(client):  # type: ignore[no-untyped-def]
    from marketplace.results.service import finalize_task

    user = register(client)
    task_id, sub_ids = stored_task(user["id"], ["a", "b"])
    claimed(sub_ids[1], node="finalize@test")
    assert finalize_task(task_id) == "waiting"


def test_the_later_of_two_subtasks_finishing_at_once_is_the_last(client):  # type: ignore[no-untyped-def]
    """Each completion's statement sees the other still Running. Before, neither was the last: the
    task waited for its chord callback, or for recovery where the chord was only partly sent."""
    import threading
    import uuid

    from sqlalchemy import select, text

    from marketplace.billing.models import Hold
    from marketplace.infra.db import new_session
    from marketplace.infra.storage import get_store
    from marketplace.results.service import part_key
    from marketplace.tasks import lifecycle
    from tests.support.wait import backends_waiting_on_locks, wait_until

    user = register(client)
    task_id, (first, second) = stored_task(user["id"], ["a", "b"])
    works = {sid: claimed(sid) for sid in (first, second)}  # two pool processes run them
    keys = {sid: part_key(task_id, i) for i, sid in enumerate((first, second))}
    shas = {sid: get_store().put_bytes(keys[sid], json.dumps([sid]).encode(), "application/json") for sid in keys}

    # The second's completion, not yet committed. It holds the hold's lock, so the first's completion
    # (which reads the hold FOR SHARE) waits after its statement has seen the second Running.
    other = new_session()
    other.execute(select(Hold.id).where(Hold.task_id == uuid.UUID(task_id)).with_for_update())
    other.execute(text("UPDATE subtasks SET status = 'Done', result_key = :k, result_sha256 = :s, seconds = 0.01, "
                       "finished_at = now() WHERE id = :id"), {"k": keys[second], "s": shas[second], "id": second})
    answer: dict[str, object] = {}

    def complete_first() -> None:
        answer["result"] = lifecycle.complete(works[first], node="race@test", key=keys[first], sha256=shas[first],
                                              seconds=0.01)

    thread = threading.Thread(target=complete_first)
    thread.start()
    try:
        wait_until(backends_waiting_on_locks, 15, "the first completion waiting on the hold")
    finally:
        other.commit()
        other.close()
    thread.join(15)
    recorded = answer["result"]
    assert (recorded.last, recorded.subtasks) == (True, 2)  # type: ignore[attr-defined]


def test_a_part_is_compact_json_with_escaped_text_and_json_dumps_constants():  # type: ignore[no-untyped-def]
    """`encode_part` replaces `json.dumps(outputs, separators=(",", ":"))`: the same values, ASCII
    only, NaN and infinities as Python's json writes and reads them, lone surrogates kept; unknown
    types still fail."""
    import math

    import pytest

    from marketplace.results.service import encode_part

    outputs = [1, "é\u2028\"\\\n", None, True, {"a": [1.5, -0.0, 1e-7, 10**30]}, [float("nan"), float("inf")]]
    data = encode_part(outputs)
    assert data.isascii() and b" " not in data
    decoded = json.loads(data)
    assert decoded[:5] == outputs[:5] and math.isnan(decoded[5][0]) and decoded[5][1] == math.inf
    vectors = [[round(0.001 * i - 0.2, 7) for i in range(384)] for _ in range(4)]
    assert json.loads(encode_part(vectors)) == vectors
    surrogates = json.loads('["\\ud800x", {"k": "\\udfff"}]')  # valid JSON input, not encodable as UTF-8
    assert json.loads(encode_part(surrogates)) == surrogates
    with pytest.raises(TypeError):  # as json.dumps always refused it: the subtask fails with the reason
        encode_part([object()])
