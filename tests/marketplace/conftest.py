"""Billing test helpers: admin accounts and direct quota/balance overrides (real Postgres)."""
from __future__ import annotations

import pytest

from tests.support.accounts import make_admin
from tests.support.api import register


@pytest.fixture()
def user(client, worker):  # type: ignore[no-untyped-def]
    return register(client)


@pytest.fixture()
def admin(client, worker):  # type: ignore[no-untyped-def]
    return make_admin(client)


@pytest.fixture()
def redis_round_trips(monkeypatch):  # type: ignore[no-untyped-def]
    """A list that gets one entry per command batch this process writes to a Redis socket."""
    from redis.connection import AbstractConnection

    sent: list[int] = []
    original = AbstractConnection.send_packed_command

    def counting(self, command, check_health=True):  # type: ignore[no-untyped-def]
        sent.append(1)
        return original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    return sent
