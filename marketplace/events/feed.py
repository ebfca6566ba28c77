"""One outbox reader per process, fanned out to every open task event stream.

`GET /v1/tasks/<id>/events` streams a task's outbox events. Each open stream reading the
outbox for itself would be a query per stream per interval; here one thread per process reads
the rows past its watermark, while any stream is open, and hands each stream its task's rows.
Polling, not LISTEN/NOTIFY: a NOTIFY in every outbox insert would take PostgreSQL's global
notify lock in the commit of every subtask's outcome (commits of notifying transactions are
serialised, cluster-wide), a cost on the hot path paid even when nobody watches; this costs one
indexed range read every `event_feed_interval` while streams are open, nothing otherwise.

Order: an outbox id is taken at insert and its row becomes visible at commit, so a row may show
up after one with a higher id (two subtasks ending together). The watermark stops at the first
missing id until it appears, or for `GAP_WAIT_S` (an id that never appears: a rolled-back
insert), so each stream gets its rows in id order, once each, and the id is a resumable
event id (`Last-Event-ID`).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, text

from marketplace.events.outbox import SUBTASK_EVENTS, TASK_EVENTS
from marketplace.infra.db import get_engine

logger = logging.getLogger(__name__)
STREAM_TYPES = (*TASK_EVENTS, *SUBTASK_EVENTS)
GAP_WAIT_S = 5.0  # how long a missing id holds the watermark (a rolled-back insert leaves one for good)
BATCH = 5000

_READ = text("""
    SELECT id, key, type, CASE WHEN key IN :keys AND type IN :types THEN payload END AS payload
    FROM outbox_events WHERE id > :after ORDER BY id LIMIT :n
""").bindparams(bindparam("keys", expanding=True), bindparam("types", expanding=True))
_TASK_EVENTS = text("""
    SELECT id, type, payload FROM outbox_events
    WHERE key = :key AND id > :after AND id <= :upto AND type IN :types ORDER BY id
""").bindparams(bindparam("types", expanding=True))


@dataclass(frozen=True)
class Event:
    id: int
    type: str
    payload: dict[str, Any]


class TooManyStreams(Exception):
    """This process holds as many open streams as it may."""


class Subscription:
    """One open stream's inbox: the rows of its task with ids above `since`, in id order."""

    def __init__(self, key: str, since: int) -> None:
        self.key = key
        self.since = since  # the watermark when it opened: older rows come from `task_events`
        self._events: deque[Event] = deque()
        self._cond = threading.Condition()
        self.closed = False

    def put(self, events: list[Event]) -> None:
        with self._cond:
            self._events.extend(events)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify()

    def get(self, timeout: float) -> list[Event]:
        """What arrived, waiting up to `timeout` for something; [] on a quiet interval or when closed."""
        with self._cond:
            if not self._events and not self.closed:
                self._cond.wait(timeout)
            out = list(self._events)
            self._events.clear()
            return out


class Feed:
    """The process's outbox reader. `subscribe` starts it; it idles when no stream is open."""

    def __init__(self, *, interval: float = 0.2, max_streams: int = 256, gap_wait: float = GAP_WAIT_S) -> None:
        self.interval = interval
        self.max_streams = max_streams
        self.gap_wait = gap_wait
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._subs: dict[str, list[Subscription]] = {}
        self._count = 0
        self.watermark: int | None = None  # every id up to it is handed out (or given up on)
        self._ahead: dict[int, tuple[str, str, Any]] = {}  # rows past a missing id
        self._gap_since: float | None = None
        self._thread: threading.Thread | None = None
        self.reads = 0  # outbox reads made (tests, the bench)

    def subscribe(self, key: str) -> Subscription:
        with self._lock:
            if self._count >= self.max_streams:
                raise TooManyStreams(f"{self._count} event streams open in this process")
            if self.watermark is None:
                with get_engine().connect() as conn:
                    self.watermark = conn.execute(text("SELECT COALESCE(max(id), 0) FROM outbox_events")).scalar_one()
            # Rows read before this stream opened carry no payload for it: read again, with theirs.
            for row_id in [i for i, row in self._ahead.items() if row[0] == key]:
                del self._ahead[row_id]
            sub = Subscription(key, self.watermark)
            self._subs.setdefault(key, []).append(sub)
            self._count += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="marketplace-event-feed", daemon=True)
                self._thread.start()
        self._wake.set()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            subs = self._subs.get(sub.key, [])
            if sub in subs:
                subs.remove(sub)
                self._count -= 1
                if not subs:
                    del self._subs[sub.key]
        sub.close()

    def close_all(self) -> None:
        """End every open stream (the process is stopping: its clients resume elsewhere)."""
        with self._lock:
            subs = [s for group in self._subs.values() for s in group]
        for sub in subs:
            sub.close()

    @property
    def open_streams(self) -> int:
        return self._count

    def _run(self) -> None:
        while True:
            if not self._count:
                self._wake.clear()
                self._wake.wait(30.0)
                continue
            try:
                self.poll()
            except Exception:  # a database blip: the streams wait, the next round reads on
                logger.warning("event feed: reading the outbox failed", exc_info=True)
                time.sleep(1.0)
            time.sleep(self.interval)

    def poll(self) -> None:
        """One read of the outbox for every open stream."""
        with self._lock:
            keys = list(self._subs) or [""]
            after = self.watermark or 0
        with get_engine().connect() as conn:
            rows = conn.execute(_READ, {"keys": keys, "types": list(STREAM_TYPES), "after": after, "n": BATCH}).all()
            conn.rollback()
        self.reads += 1
        with self._lock:
            for row in rows:
                if row.payload is None and row.key in self._subs and row.type in STREAM_TYPES:
                    continue  # its stream opened during this read: the next read brings it, with its payload
                self._ahead[row.id] = (row.key, row.type, row.payload)
            self._advance()

    def _advance(self) -> None:
        """Hand out the rows up to the first missing id; past it after `gap_wait` (under the lock)."""
        assert self.watermark is not None
        out: dict[str, list[Event]] = {}
        while self._ahead:
            nxt = self.watermark + 1
            if nxt not in self._ahead:
                now = time.monotonic()
                if self._gap_since is None:
                    self._gap_since = now
                if now - self._gap_since < self.gap_wait:
                    break
                nxt = min(self._ahead)  # given up: a rolled-back insert
            self._gap_since = None
            key, type_, payload = self._ahead.pop(nxt)
            self.watermark = nxt
            if payload is not None:
                out.setdefault(key, []).append(Event(nxt, type_, payload))
        if not self._ahead:
            self._gap_since = None
        for key, events in out.items():
            for sub in self._subs.get(key, []):
                sub.put([e for e in events if e.id > sub.since])


def task_events(*, key: str, after: int, upto: int) -> list[Event]:
    """A task's stream events with ids in (after, upto], read once when a stream opens."""
    with get_engine().connect() as conn:
        rows = conn.execute(_TASK_EVENTS, {"key": key, "after": after, "upto": upto,
                                           "types": list(STREAM_TYPES)}).all()
        conn.rollback()
    return [Event(r.id, r.type, r.payload) for r in rows]


_feed: Feed | None = None
_feed_lock = threading.Lock()


def get_feed() -> Feed:
    """This process's feed (built on first use, from the settings)."""
    global _feed
    with _feed_lock:
        if _feed is None:
            from marketplace.settings import get_settings

            settings = get_settings()
            _feed = Feed(interval=settings.event_feed_interval, max_streams=settings.event_streams_per_worker)
        return _feed


def reset_feed() -> None:
    """Forget the feed (after fork; tests): its streams end."""
    global _feed
    with _feed_lock:
        if _feed is not None:
            _feed.close_all()
        _feed = None
