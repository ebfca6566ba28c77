"""Celery's Redis result backend, with a chord's setup in one round trip, and a way to drop a
chord whose callback is no longer wanted.

`celeryconfig.override_backends` makes it the `redis://` and `rediss://` result backend, so
URLs, Flower and `celery result` read as stock Redis ones.
"""
from __future__ import annotations

from typing import Any

from celery.backends import redis as celery_redis


class RedisBackend(celery_redis.RedisBackend):  # type: ignore[misc]
    def set_chord_size(self, group_id: str, chord_size: int) -> None:
        """Stock Celery sends the counter's DEL and the size's SET as two round trips before a
        chord's first message goes out (a single-item job waits on both); one pipeline here."""

        def reset(counter: str, size: str) -> Any:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.delete(counter)
                pipe.set(size, chord_size, ex=self.chord_expires or None)
                return pipe.execute()

        self.ensure(reset, (self.get_key_for_group(group_id, ".c"), self.get_key_for_group(group_id, ".s")))

    def forget_chord(self, group_id: str) -> None:
        """Delete a chord's keys (its size, counter, claim and the parts' results) in one round trip:
        the chord's callback is not wanted (see `workers.tasks`), and nothing is left for expiry."""
        keys = [self.get_key_for_group(group_id, suffix) for suffix in ("", ".j", ".t", ".s", ".d", ".c")]
        self.ensure(self.client.delete, keys)
