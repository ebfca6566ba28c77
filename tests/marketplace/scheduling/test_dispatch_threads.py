"""A dispatch goes through the marketplace's Celery app from whichever thread sends it."""
from __future__ import annotations

import threading
import uuid

from tests.support.env import private_broker


def test_a_dispatch_from_another_thread_publishes_through_the_marketplace_app(stack, monkeypatch):  # type: ignore[no-untyped-def]
    """gRPC runs `Reschedule` on its own threads. There an unbound signature took Celery's fallback
    app, configured on its own: the stock result backend and producer, not ours (and, after a
    switch of broker, the one it first read)."""
    from marketplace.infra import result_backend
    from marketplace.infra.celery_app import app
    from marketplace.scheduling.service import dispatch

    seen: list[object] = []
    original = result_backend.RedisBackend.set_chord_size

    def spy(self, group_id, chord_size):  # type: ignore[no-untyped-def]
        seen.append(self.app)
        return original(self, group_id, chord_size)

    monkeypatch.setattr(result_backend.RedisBackend, "set_chord_size", spy)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            dispatch(str(uuid.uuid4()), [str(uuid.uuid4())], queue="cpu.generic", priority=0, time_limit=60)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    with private_broker():  # no node consumes what is sent
        thread = threading.Thread(target=send)
        thread.start()
        thread.join(timeout=60)
    assert not errors, errors
    assert seen == [app], "the chord was set up by another app's result backend"
