"""The periodic verification publishes its verdict where /metrics reads it."""
from __future__ import annotations

import json

from sqlalchemy import text

from tests.support.api import register


def test_verify_job_records_a_valid_then_an_invalid_chain(client, redis_client):  # type: ignore[no-untyped-def]
    from marketplace.audit import service
    from marketplace.audit.tasks import verify
    from marketplace.infra.db import get_engine
    from marketplace.observability.metrics import AUDIT_VERIFY_KEY

    register(client)  # at least one record
    service.chain_pending()
    report = verify()
    stored = json.loads(redis_client.get(AUDIT_VERIFY_KEY))
    assert report["valid"] and stored["valid"] is True and stored["length"] == report["length"] > 0
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "marketplace_audit_chain_valid 1.0" in metrics

    with get_engine().begin() as conn:
        seq = conn.execute(text("SELECT max(seq) FROM audit_records")).scalar()
        conn.execute(text("UPDATE audit_records SET data = data || ' ' WHERE seq = :s"), {"s": seq})
    try:
        report = verify()
        assert not report["valid"] and report["first_bad_seq"] == seq
        assert json.loads(redis_client.get(AUDIT_VERIFY_KEY))["valid"] is False
        assert "marketplace_audit_chain_valid 0.0" in client.get("/metrics").get_data(as_text=True)
    finally:
        with get_engine().begin() as conn:
            conn.execute(text("UPDATE audit_records SET data = rtrim(data, ' ') WHERE seq = :s"), {"s": seq})
