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
