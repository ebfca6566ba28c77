"""The process's one outbox reader (`events.feed`): each stream gets its task's rows once, in id
order, even when a lower id commits after a higher one; one read serves every open stream."""
from __future__ import annotations

import uuid

from sqlalchemy import text

INSERT = text("INSERT INTO outbox_events (topic, key, type, payload, created_at) "
              "VALUES ('t', :key, 'SubTaskCompleted', CAST(:p AS jsonb), now()) RETURNING id")


def test_a_lower_id_committed_late_is_handed_out_before_the_higher_one(stack) -> None:  # type: ignore[no-untyped-def]
    from marketplace.events.feed import Feed
    from marketplace.infra.db import get_engine

    feed = Feed(interval=60, gap_wait=30)  # rounds by hand (`poll`), the gap held for the whole test
    key, other = str(uuid.uuid4()), str(uuid.uuid4())
    sub = feed.subscribe(key)
    others = feed.subscribe(other)
    slow = get_engine().connect()
    try:
        slow_tx = slow.begin()
        low = slow.execute(INSERT, {"key": key, "p": '{"n": 1}'}).scalar_one()  # its id taken, not committed
        with get_engine().begin() as conn:
            high = conn.execute(INSERT, {"key": key, "p": '{"n": 2}'}).scalar_one()
            conn.execute(INSERT, {"key": other, "p": '{"n": 3}'})
        assert low < high
        feed.poll()
        assert sub.get(timeout=0) == []  # `high` waits behind the missing `low`
        slow_tx.commit()
        feed.poll()
        got = sub.get(timeout=0)
        assert [(e.id, e.payload["n"]) for e in got] == [(low, 1), (high, 2)]
        assert [e.payload["n"] for e in others.get(timeout=0)] == [3]
        reads = feed.reads
        feed.poll()
        assert sub.get(timeout=0) == [] and feed.reads == reads + 1  # nothing twice; one read for both streams
    finally:
        slow.close()
        feed.unsubscribe(sub)
        feed.unsubscribe(others)


def test_a_rolled_back_id_holds_the_stream_only_for_the_gap_wait(stack) -> None:  # type: ignore[no-untyped-def]
    import time

    from marketplace.events.feed import Feed
    from marketplace.infra.db import get_engine

    feed = Feed(interval=60, gap_wait=0.5)
    key = str(uuid.uuid4())
    sub = feed.subscribe(key)
    try:
        with get_engine().connect() as conn:
            tx = conn.begin()
            conn.execute(INSERT, {"key": key, "p": '{"n": 0}'})
            tx.rollback()  # its id is gone for good
        with get_engine().begin() as conn:
            after = conn.execute(INSERT, {"key": key, "p": '{"n": 1}'}).scalar_one()
        feed.poll()
        assert sub.get(timeout=0) == []
        time.sleep(0.6)
        feed.poll()
        assert [e.id for e in sub.get(timeout=0)] == [after]
    finally:
        feed.unsubscribe(sub)
