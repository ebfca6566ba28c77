"""Fault tests get a broker of their own, so killing or flushing it never touches other tests."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.api import api_app
from tests.support.env import private_broker
from tests.support.servers import RedisServer


@pytest.fixture()
def own_broker(stack: dict[str, str]) -> Iterator[RedisServer]:
    """A private Redis for this test; the in-process API and the workers it starts use it."""
    with private_broker() as server:
        yield server


@pytest.fixture()
def app(own_broker: RedisServer):  # type: ignore[no-untyped-def]
    """The API app, built after the switch to this test's broker (limits and tokens live there)."""
    return api_app()
