"""Fixtures for the REST gateway tests: users, a second app with tight limits, a live gunicorn."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.api import register
from tests.support.servers import free_port, wait_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def user(client):  # type: ignore[no-untyped-def]
    return register(client)


@pytest.fixture()
def other(client):  # type: ignore[no-untyped-def]
    return register(client)


@pytest.fixture()
def make_app(stack):  # type: ignore[no-untyped-def]
    """An app built from settings overrides, e.g. make_app(rate_limit="3/minute")."""
    from api import create_app
    from marketplace.settings import Settings

    def build(**overrides):  # type: ignore[no-untyped-def]
        application = create_app(Settings(**overrides))
        application.config["TESTING"] = True
        return application

    return build


@pytest.fixture(scope="session")
def live_api(stack) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """`marketplace api` (gunicorn) on a free port, with the test stack's environment."""
    port = free_port()
    env = {**os.environ, **stack}
    proc = subprocess.Popen(
        [sys.executable, "-m", "marketplace.cli", "api", "--port", str(port), "--workers", "1", "--threads", "4"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_port(port, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
