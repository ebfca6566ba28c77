"""The audit chain with real workers: it verifies after a busy run; tampering is found at the right seq."""
from __future__ import annotations

import base64

import pytest
from click.testing import CliRunner
from sqlalchemy import select, text, update

from tests.support.api import register, wait_for_task


def _busy_run(client, n_users: int = 3, tasks_each: int = 3) -> list[tuple[dict, str]]:  # type: ignore[no-untyped-def,type-arg]
    users = [register(client) for _ in range(n_users)]
    started = []
    for _ in range(tasks_each):
        for u in users:
            resp = client.post("/v1/tasks", json={"model": "echo", "inputs": list(range(8)), "batch_size": 2},
                               headers=u["headers"])
            assert resp.status_code == 202, resp.get_json()
            started.append((u, resp.get_json()["id"]))
    for u, task_id in started:
        assert wait_for_task(client, u["headers"], task_id, timeout=180)["status"] == "Done"
    return started


def test_chain_verifies_after_a_busy_run_and_tasks_show_their_records(client, admin):  # type: ignore[no-untyped-def]
    started = _busy_run(client)
    owner, task_id = started[0]
    client.get(f"/v1/tasks/{task_id}/result", headers=owner["headers"])

    report = client.get("/v1/audit/verify", headers=admin["headers"]).get_json()
    assert report["valid"] is True, report
    assert report["first_bad_seq"] is None and report["length"] >= 9 * 4 and len(report["head"]) == 64

    docs = client.get(f"/v1/audit?task_id={task_id}&limit=1000", headers=owner["headers"]).get_json()["records"]
    actions = [d["action"] for d in docs]
    assert actions.count("task.created") == 1 and actions.count("task.done") == 1
    assert actions.count("subtask.started") == 4 and actions.count("subtask.finished") == 4, actions
    assert actions.count("billing.charge") == 4 and "task.dispatched" in actions
    assert "task.result_downloaded" in actions
    assert all(d["task_id"] == task_id for d in docs)
    seqs = [d["seq"] for d in docs]
    assert seqs == sorted(seqs)

    other = register(client)
    assert client.get(f"/v1/audit?task_id={task_id}", headers=other["headers"]).status_code == 404
    assert client.get(f"/v1/audit?task_id={task_id}", headers=admin["headers"]).status_code == 200
    bad = client.get("/v1/audit?task_id=not-a-uuid", headers=owner["headers"])  # as the ledger's filter: 422
    assert bad.status_code == 422 and bad.get_json()["errors"][0]["field"] == "task_id"
    assert client.get("/v1/audit/verify", headers=owner["headers"]).status_code == 403
    assert client.post("/v1/auth/logout", headers=other["headers"]).status_code == 204
    other["headers"] = {"Authorization": f"Bearer {client.post('/v1/auth/login', json={'email': other['email'], 'password': other['password']}).get_json()['access_token']}"}
    assert client.post("/v1/auth/login", json={"email": other["email"], "password": "wrong!"}).status_code == 401
    mine = client.get("/v1/audit", headers=other["headers"]).get_json()["records"]
    assert {d["action"] for d in mine} >= {"user.registered", "user.login", "user.logout", "user.login_failed"}
    assert all(f"user:{other['id']}" in (d["actor"], d["subject"]) for d in mine)

    # Signatures check out with the published key; worker lifecycle is recorded.
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    pem = client.get("/v1/audit/public-key")
    assert pem.status_code == 200
    key = load_pem_public_key(pem.data)
    key.verify(bytes.fromhex(docs[0]["signature"]), bytes.fromhex(docs[0]["hash"]))
    all_docs = client.get("/v1/audit?limit=1000", headers=admin["headers"]).get_json()["records"]
    assert "worker.online" in {d["action"] for d in all_docs}


def _middle_seq(session) -> int:  # type: ignore[no-untyped-def]
    from marketplace.audit.models import AuditRecord

    top = session.scalar(select(AuditRecord.seq).order_by(AuditRecord.seq.desc()).limit(1))
    assert top and top >= 10
    return top // 2


@pytest.fixture()
def chain(client, admin):  # type: ignore[no-untyped-def]
    """A chain with some history; tampering happens in a transaction that is rolled back."""
    _busy_run(client, n_users=1, tasks_each=2)
    from marketplace.audit import service

    service.chain_pending()
    from marketplace.infra.db import new_session

    session = new_session()
    assert service.verify_chain(session)["valid"]
    yield session
    session.rollback()
    session.close()


def test_an_edited_record_is_found_at_its_seq(chain):  # type: ignore[no-untyped-def]
    from marketplace.audit.models import AuditRecord
    from marketplace.audit.service import verify_chain

    seq = _middle_seq(chain)
    chain.execute(update(AuditRecord).where(AuditRecord.seq == seq).values(data='{"forged":true}'))
    report = verify_chain(chain)
    assert report["valid"] is False and report["first_bad_seq"] == seq and report["length"] == seq - 1, report
    assert "hash" in report["reason"]


def test_a_rehashed_edit_is_caught_by_the_signature(chain):  # type: ignore[no-untyped-def]
    from marketplace.audit.models import AuditRecord
    from marketplace.audit.service import record_hash, verify_chain

    seq = _middle_seq(chain)
    r = chain.scalar(select(AuditRecord).where(AuditRecord.seq == seq))
    forged = record_hash(prev_hash=r.prev_hash, seq=r.seq, ts=r.ts, actor="user:evil", action=r.action,
                         subject=r.subject, task_id=r.task_id, data=r.data)
    chain.execute(update(AuditRecord).where(AuditRecord.seq == seq).values(actor="user:evil", hash=forged))
    report = verify_chain(chain)
    assert report["first_bad_seq"] == seq and "signature" in report["reason"], report


def test_a_deleted_record_is_found_at_its_seq(chain):  # type: ignore[no-untyped-def]
    from marketplace.audit.service import verify_chain

    seq = _middle_seq(chain)
    chain.execute(text("DELETE FROM audit_records WHERE seq = :s"), {"s": seq})
    report = verify_chain(chain)
    assert report["valid"] is False and report["first_bad_seq"] == seq and "deleted" in report["reason"], report


def test_two_swapped_records_are_found_at_the_first(chain):  # type: ignore[no-untyped-def]
    from marketplace.audit.service import verify_chain

    seq = _middle_seq(chain)
    chain.execute(text("UPDATE audit_records SET seq = -1 WHERE seq = :a"), {"a": seq})
    chain.execute(text("UPDATE audit_records SET seq = :a WHERE seq = :b"), {"a": seq, "b": seq + 1})
    chain.execute(text("UPDATE audit_records SET seq = :b WHERE seq = -1"), {"b": seq + 1})
    report = verify_chain(chain)
    assert report["valid"] is False and report["first_bad_seq"] == seq, report


def _top(session) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    from marketplace.audit.models import AuditRecord

    top = session.execute(select(AuditRecord.seq, AuditRecord.hash).order_by(AuditRecord.seq.desc()).limit(1)).one()
    root = session.scalar(select(AuditRecord.hash).where(AuditRecord.seq == 1))
    return top.seq, top.hash, root


def test_the_head_is_anchored_outside_postgres_and_only_moves_forward(chain):  # type: ignore[no-untyped-def]
    from marketplace.audit import anchor
    from marketplace.audit.service import verify_chain

    seq, head, root = _top(chain)
    assert anchor.read(root) == (seq, head)
    anchor.write(root=root, seq=seq - 5, head="0" * 64)  # a late writer with an older head
    assert anchor.read(root) == (seq, head)
    assert verify_chain(chain)["anchored_seq"] == seq


def test_a_record_appended_while_verify_runs_is_no_truncation(chain, monkeypatch):  # type: ignore[no-untyped-def]
    """The anchor is read before the walk's snapshot: an append committed in between is in both."""
    from marketplace.audit import anchor, service

    real_read = anchor.read

    def read_after_an_append(root: str):  # type: ignore[no-untyped-def]
        service.record(actor="system", action="test.appended", subject="test:verify")  # commits, moves the anchor
        return real_read(root)

    monkeypatch.setattr(anchor, "read", read_after_an_append)
    seq, _, _ = _top(chain)
    report = service.verify_chain(chain)
    assert report["valid"] is True and report["anchored_seq"] == seq + 1, report


def test_records_cut_from_the_end_are_found_by_the_anchor(chain):  # type: ignore[no-untyped-def]
    from marketplace.audit.service import verify_chain

    seq, _, _ = _top(chain)
    chain.execute(text("DELETE FROM audit_records WHERE seq > :s"), {"s": seq - 3})
    report = verify_chain(chain)  # the shorter chain is intact in itself
    assert report["valid"] is False and report["first_bad_seq"] == seq - 2 and report["length"] == seq - 3, report
    assert "truncated" in report["reason"] and report["anchored_seq"] == seq


def test_a_chain_rewritten_up_to_its_head_differs_from_the_anchor(chain):  # type: ignore[no-untyped-def]
    from marketplace.audit import anchor
    from marketplace.audit.service import verify_chain
    from marketplace.infra.redis_client import get_redis

    seq, _, root = _top(chain)
    get_redis().hset(anchor.KEY_PREFIX + root[:32], "hash", "f" * 64)  # what the head was before a re-signing
    try:
        report = verify_chain(chain)
        assert report["valid"] is False and report["first_bad_seq"] == seq and "rewritten" in report["reason"], report
    finally:
        get_redis().delete(anchor.KEY_PREFIX + root[:32])
    assert verify_chain(chain)["valid"] is True  # no anchor kept (Redis flushed): the chain alone is checked


def test_cli_verify_exits_1_naming_the_first_bad_seq(client, admin):  # type: ignore[no-untyped-def]
    _busy_run(client, n_users=1, tasks_each=1)
    from marketplace.audit.models import AuditRecord
    from marketplace.cli.main import main
    from marketplace.infra.db import session_scope

    ok = CliRunner().invoke(main, ["audit", "verify"])
    assert ok.exit_code == 0 and "valid" in ok.output, ok.output
    with session_scope() as session:
        seq = _middle_seq(session)
        original = session.scalar(select(AuditRecord.data).where(AuditRecord.seq == seq))
        session.execute(update(AuditRecord).where(AuditRecord.seq == seq).values(data='{"x":1}'))
    try:
        bad = CliRunner().invoke(main, ["audit", "verify"])
        assert bad.exit_code == 1 and f"first bad seq {seq}" in bad.output, bad.output
        api = client.get("/v1/audit/verify", headers=admin["headers"]).get_json()
        assert api["valid"] is False and api["first_bad_seq"] == seq
    finally:
        with session_scope() as session:
            session.execute(update(AuditRecord).where(AuditRecord.seq == seq).values(data=original))
    assert CliRunner().invoke(main, ["audit", "verify"]).exit_code == 0


def test_signing_key_comes_from_the_setting(monkeypatch):  # type: ignore[no-untyped-def]
    from marketplace.audit import signing
    from marketplace.settings import reset_settings

    seed = bytes(range(32))
    monkeypatch.setenv("MARKETPLACE_AUDIT_SIGNING_KEY", base64.b64encode(seed).decode())
    reset_settings()
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        expected = Ed25519PrivateKey.from_private_bytes(seed).public_key()
        digest = "ab" * 32
        assert signing.verify(digest, signing.sign(digest), expected)
        monkeypatch.setenv("MARKETPLACE_AUDIT_SIGNING_KEY", base64.b64encode(b"short").decode())
        reset_settings()
        with pytest.raises(ValueError, match="32"):
            signing.sign(digest)
    finally:
        monkeypatch.delenv("MARKETPLACE_AUDIT_SIGNING_KEY")
        reset_settings()


def test_a_process_with_another_key_leaves_its_records_to_one_with_the_chains_key(client, admin, monkeypatch):  # type: ignore[no-untyped-def]
    """A node or `marketplace users create` without the API's signing key signed records that
    broke the chain for good (first bad seq: theirs). Now they wait in audit_pending."""
    import uuid

    from marketplace.audit import service as audit
    from marketplace.audit.models import AuditPending, AuditRecord
    from marketplace.infra.db import session_scope
    from marketplace.settings import reset_settings

    audit.record(actor="test", action="test.right_key", subject="chain")  # record 1 exists, signed by our key
    subject = f"wrong-key:{uuid.uuid4()}"
    monkeypatch.setenv("MARKETPLACE_AUDIT_SIGNING_KEY", base64.b64encode(bytes(range(32))).decode())
    reset_settings()
    try:
        audit.record(actor="ops", action="test.wrong_key", subject=subject)
        assert audit.chain_pending() == 0
        with session_scope() as session:
            assert session.scalar(select(AuditRecord.seq).where(AuditRecord.subject == subject)) is None
            assert session.scalar(select(AuditPending.action).where(AuditPending.subject == subject)) == "test.wrong_key"
            report = audit.verify_chain(session)
        assert report["valid"] is False and report["first_bad_seq"] == 1, report
        assert "MARKETPLACE_AUDIT_SIGNING_KEY" in report["reason"]
    finally:
        monkeypatch.delenv("MARKETPLACE_AUDIT_SIGNING_KEY")
        reset_settings()
    audit.chain_pending()
    with session_scope() as session:
        assert session.scalar(select(AuditRecord.action).where(AuditRecord.subject == subject)) == "test.wrong_key"
    assert client.get("/v1/audit/verify", headers=admin["headers"]).get_json()["valid"] is True


def test_buffered_subtask_records_are_chained_after_the_task_ends_without_a_reader(client, admin):  # type: ignore[no-untyped-def]
    import time

    from marketplace.audit.models import AuditPending, AuditRecord
    from marketplace.infra.db import session_scope

    u = register(client)
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": list(range(6)), "batch_size": 1},
                       headers=u["headers"])
    task_id = resp.get_json()["id"]
    assert wait_for_task(client, u["headers"], task_id)["status"] == "Done"
    deadline = time.monotonic() + 30
    while True:
        with session_scope() as session:
            chained = session.scalars(select(AuditRecord.action).where(AuditRecord.task_id == task_id)).all()
            pending = session.scalars(select(AuditPending.id).where(AuditPending.task_id == task_id)).all()
        if chained.count("subtask.finished") == 6 and not pending:
            break
        assert time.monotonic() < deadline, (chained, pending)
        time.sleep(0.2)
    assert chained.count("subtask.started") == 6 and chained.count("billing.charge") == 6


def test_a_transactions_buffered_records_are_written_at_its_commit_as_given(stack):  # type: ignore[no-untyped-def]
    """`enqueue` buffers; the commit writes them in one statement, in order, `ts` to the microsecond;
    a rollback writes none."""
    import uuid

    from marketplace.audit import service
    from marketplace.audit.models import AuditPending
    from marketplace.infra.db import session_scope, transaction_buffer

    subject = f"test:{uuid.uuid4().hex}"
    with session_scope() as session:
        service.enqueue(session, actor="user:x", action="test.first", subject=subject, task_id=None,
                        data={"note": "é \"q\"", "n": 1})
        service.enqueue(session, actor="api", action="test.second", subject=subject, task_id=uuid.UUID(int=7))
        buffered = [dict(v) for v in transaction_buffer(session, service._PENDING_KEY)]
    with pytest.raises(RuntimeError), session_scope() as session:
        session.execute(text("SELECT 1"))
        service.enqueue(session, actor="api", action="test.rolled_back", subject=subject)
        raise RuntimeError("the transaction fails")
    with session_scope() as session:
        rows = session.execute(select(AuditPending.ts, AuditPending.actor, AuditPending.action, AuditPending.subject,
                                      AuditPending.task_id, AuditPending.data)
                               .where(AuditPending.subject == subject).order_by(AuditPending.id)).all()
    assert [tuple(r) for r in rows] == [
        (b["ts"], b["actor"], b["action"], b["subject"], b["task_id"], b["data"]) for b in buffered]
    assert [r.action for r in rows] == ["test.first", "test.second"]
    assert rows[1].task_id == str(uuid.UUID(int=7)) and rows[0].task_id is None


def test_a_rollback_before_any_statement_forgets_the_buffered_records(stack):  # type: ignore[no-untyped-def]
    """A session rolled back before it touched the database has no DBAPI rollback to report; its
    buffered records must still go, not ride along with the session's next commit. A savepoint
    rolled back inside a transaction takes the records added inside it and leaves the
    transaction's own; a session closed without a commit takes its records with it."""
    import uuid

    from marketplace.audit import service
    from marketplace.audit.models import AuditPending, AuditRecord
    from marketplace.infra.db import new_session

    subject = f"test:{uuid.uuid4().hex}"
    session = new_session()
    try:
        service.enqueue(session, actor="api", action="test.rolled_back", subject=subject)
        session.rollback()
        service.enqueue(session, actor="api", action="test.kept", subject=subject)
        savepoint = session.begin_nested()
        session.execute(text("SELECT 1"))
        service.append(session, actor="api", action="test.in_savepoint", subject=subject)
        service.enqueue(session, actor="api", action="test.in_savepoint", subject=subject)
        savepoint.rollback()
        session.commit()
        service.enqueue(session, actor="api", action="test.closed", subject=subject)
        session.close()
        session.commit()
        actions = session.scalars(select(AuditPending.action).where(AuditPending.subject == subject)).all()
        chained = session.scalars(select(AuditRecord.action).where(AuditRecord.subject == subject)).all()
    finally:
        session.close()
    assert actions == ["test.kept"] and chained == []
