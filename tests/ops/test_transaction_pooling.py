"""`MARKETPLACE_DATABASE_TRANSACTION_POOLING`: the marketplace behind PgBouncer in transaction
mode (Debian's `pgbouncer`), where each transaction may get another server connection."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal

import pytest
from sqlalchemy import create_engine, exc

from marketplace.catalog import CONTROL_QUEUES
from tests.support.api import register, wait_for_task
from tests.support.env import private_broker, switched_env
from tests.support.servers import CeleryWorker, PgBouncer, Postgres

CONTROL = list(CONTROL_QUEUES)  # the catalog names the control queues


@pytest.fixture(scope="module")
def bouncer(postgres: Postgres) -> Iterator[PgBouncer]:
    server = PgBouncer(postgres, pool_size=4)
    yield server
    server.stop()


def _statement(name: str):  # type: ignore[no-untyped-def]
    from marketplace.infra.prepared import Prepared

    # A literal `%` and a parameter used twice: what inline text must get right.
    return Prepared(name, "SELECT CAST(:n AS int) * 2 AS twice, :tag || '%' AS tag, :n AS n",
                    types={"n": "int", "tag": "text"})


def _second_call_on_another_server(engine, stmt) -> tuple:  # type: ignore[no-untyped-def, type-arg]
    """Run `stmt` on one client connection, then again while another client holds the server
    connection the first one used: PgBouncer hands the first a server of its own."""
    with engine.connect() as first, engine.connect() as other:
        assert stmt.execute(first, {"n": 1, "tag": "a"}).one() == (2, "a%", 1)
        first.commit()  # the server connection goes back to PgBouncer's pool
        other.exec_driver_sql("SELECT 1")  # in a transaction: it keeps the only idle server
        try:
            return tuple(stmt.execute(first, {"n": 2, "tag": "b"}).one())
        finally:
            first.rollback()
            other.rollback()


def test_prepared_statements_fail_behind_a_transaction_pooler_and_inline_ones_work(bouncer, caplog):  # type: ignore[no-untyped-def]
    from marketplace.infra.prepared import send_inline

    prepared = create_engine(bouncer.url)
    with pytest.raises(exc.DBAPIError, match="prepared statement .* does not exist"):
        _second_call_on_another_server(prepared, _statement(f"mp_test_{uuid.uuid4().hex[:8]}"))
    prepared.dispose()
    # The operator is told which setting fixes it.
    assert "set MARKETPLACE_DATABASE_TRANSACTION_POOLING=true" in caplog.text

    inline = create_engine(bouncer.url)
    send_inline(inline)
    assert _second_call_on_another_server(inline, _statement(f"mp_test_{uuid.uuid4().hex[:8]}")) == (4, "b%", 2)
    inline.dispose()


def test_the_setting_sends_every_statement_inline(stack, bouncer):  # type: ignore[no-untyped-def]
    from marketplace.infra.db import get_engine

    with switched_env(MARKETPLACE_DATABASE_URL=bouncer.url, MARKETPLACE_DATABASE_TRANSACTION_POOLING="true"):
        assert _second_call_on_another_server(get_engine(), _statement("mp_test_setting")) == (4, "b%", 2)
        with get_engine().connect() as conn:  # no session SET either: the timeout is the role's
            source = conn.exec_driver_sql("SELECT source FROM pg_settings WHERE name = 'statement_timeout'").scalar()
            assert source != "session"
    with get_engine().connect() as conn:  # a direct connection sets its own
        assert conn.exec_driver_sql("SELECT source FROM pg_settings WHERE name = 'statement_timeout'").scalar() == "session"


def test_jobs_run_end_to_end_through_a_transaction_pooler(stack, bouncer):  # type: ignore[no-untyped-def]
    """The API and a node both behind PgBouncer: submits (one keyed), scheduling, subtasks, their
    charges and finalize; every job Done with its outputs, the balance charged exactly."""
    from api import create_app
    from marketplace.infra.redis_client import get_redis
    from marketplace.settings import get_settings

    with private_broker(), switched_env(MARKETPLACE_DATABASE_URL=bouncer.url,
                                        MARKETPLACE_DATABASE_TRANSACTION_POOLING="true"):
        client = create_app(get_settings()).test_client()
        node = CeleryWorker(CONTROL + ["cpu.generic"], name=f"pooled-{uuid.uuid4().hex[:4]}", concurrency=2)
        try:
            node.wait_ready(get_redis())
            user = register(client)
            headers = user["headers"]
            before = Decimal(client.get("/v1/me", headers=headers).get_json()["balance"])
            jobs = {
                client.post("/v1/tasks", json={"model": "echo", "inputs": list(range(6)), "batch_size": 2},
                            headers=headers).get_json()["id"]: list(range(6)),
                client.post("/v1/tasks", json={"model": "echo", "inputs": ["k"]},
                            headers={**headers, "Idempotency-Key": uuid.uuid4().hex}).get_json()["id"]: ["k"],
            }
            cost = Decimal(0)
            for task_id, inputs in jobs.items():
                doc = wait_for_task(client, headers, task_id, timeout=60)
                assert doc["status"] == "Done", (doc, node.tail(40))
                assert client.get(f"/v1/tasks/{task_id}/result", headers=headers).get_json()["outputs"] == inputs
                cost += Decimal(doc["cost"])
            after = Decimal(client.get("/v1/me", headers=headers).get_json()["balance"])
            assert cost > 0 and after == before - cost
        finally:
            node.stop()
