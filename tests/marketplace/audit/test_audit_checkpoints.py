"""Signed checkpoints of the real chain: written to the object store, the outbox (Kafka) and the
API; pulled outside; and the public-key verifier over a database URL catching, against them, a
tampered record, a deleted tail and a middle rewritten and re-signed with the platform's own key.

Tampering happens on a copy of audit_records in a schema of its own (the verifier reads it through
the URL's search_path): the chain every other test relies on is never touched."""
from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import psycopg2
import pytest
from click.testing import CliRunner

from tests.marketplace.audit.test_audit_chain import _busy_run


def _sql(url: str, sql: str, *args: object) -> list:  # type: ignore[type-arg]
    conn = psycopg2.connect(url.replace("postgresql+psycopg2://", "postgresql://", 1))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def _checkpoint_now() -> dict:  # type: ignore[type-arg]
    from marketplace.audit import checkpoints, service

    service.chain_pending()
    cp = checkpoints.write_checkpoint(force=True)
    assert cp is not None
    return cp


@pytest.fixture(scope="module")
def published(stack, worker, tmp_path_factory):  # type: ignore[no-untyped-def]
    """Two checkpoints with a busy run before each, pulled into a folder; the public key in a file."""
    from api import create_app
    from marketplace.audit import checkpoints
    from marketplace.cli.main import main
    from marketplace.settings import get_settings

    client = create_app(get_settings()).test_client()
    _busy_run(client, n_users=1, tasks_each=1)
    first = _checkpoint_now()
    assert checkpoints.write_checkpoint() is None  # the next is not due (10,000 records or 60 s)
    _busy_run(client, n_users=1, tasks_each=1)
    second = _checkpoint_now()
    assert second["size"] > first["size"]
    folder, key = tmp_path_factory.mktemp("checkpoints"), tmp_path_factory.mktemp("key") / "audit.pem"
    key.write_bytes(client.get("/v1/audit/public-key").data)
    pulled = CliRunner().invoke(main, ["audit", "pull-checkpoints", "--store", str(folder)])
    assert pulled.exit_code == 0, pulled.output
    return {"dir": folder, "key": key, "first": first, "second": second, "sizes": (first["size"], second["size"])}


def test_checkpoints_are_signed_and_published_in_the_store_the_outbox_and_the_api(client, published, stack,  # type: ignore[no-untyped-def]
                                                                                   tmp_path):
    from marketplace.audit import checkpoints
    from marketplace.audit.hashing import checkpoint_bytes, checkpoint_problem, load_public_key
    from marketplace.cli.main import main
    from marketplace.events import codec
    from marketplace.events.models import OutboxEvent
    from marketplace.infra.db import session_scope
    from marketplace.infra.storage import get_store

    first, second = published["first"], published["second"]
    key = load_public_key(published["key"].read_bytes())
    for cp in (first, second):
        assert checkpoint_problem(cp, key) is None
        assert get_store().get_bytes(checkpoints.store_key(cp["size"])) == checkpoint_bytes(cp)
    with session_scope() as session:
        row = session.query(OutboxEvent).filter(OutboxEvent.type == "AuditCheckpoint",
                                                OutboxEvent.payload["size"].as_integer() == second["size"]).one()
        assert row.topic == "marketplace.audit"
        value, headers = codec.encode(event_id=row.id, type=row.type, key=row.key, payload=row.payload,
                                      created_at=row.created_at)
    msg = codec.decode(value)
    assert (msg.DESCRIPTOR.name, msg.size, msg.root, msg.head, msg.time, msg.signature) == (
        "AuditCheckpoint", second["size"], second["root"], second["head"], second["time"], second["signature"])
    assert ("type", b"AuditCheckpoint") in headers

    page = client.get("/v1/audit/checkpoints?limit=1000")  # public: no token
    assert page.status_code == 200
    assert first in page.get_json()["checkpoints"] and second in page.get_json()["checkpoints"]

    saved = {p.name: p.read_bytes() for p in Path(published["dir"]).glob("*.json")}
    assert saved[f"{second['size']:020d}.json"] == checkpoint_bytes(second)
    again = CliRunner().invoke(main, ["audit", "pull-checkpoints", "--store", str(published["dir"])])
    assert again.exit_code == 0 and again.output.startswith("0 new"), again.output
    from_s3 = CliRunner().invoke(main, ["audit", "pull-checkpoints", "--s3", stack["MARKETPLACE_S3_BUCKET"],
                                        "--endpoint-url", stack["MARKETPLACE_S3_ENDPOINT_URL"], str(tmp_path)])
    assert from_s3.exit_code == 0, from_s3.output
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.json")} == saved

    # A different checkpoint of a size already saved is kept beside it, and said: a fork.
    forged = {**second, "time": "2026-01-01T00:00:00.000000Z"}
    get_store().put_bytes(checkpoints.store_key(second["size"]), checkpoint_bytes(forged))
    try:
        fork = CliRunner().invoke(main, ["audit", "pull-checkpoints", "--store", str(tmp_path)])
        assert fork.exit_code == 1 and "fork" in fork.output, fork.output
        assert len(list(tmp_path.glob(f"{second['size']:020d}*.json"))) == 2
    finally:
        get_store().put_bytes(checkpoints.store_key(second["size"]), checkpoint_bytes(second))


@pytest.fixture()
def copy(postgres):  # type: ignore[no-untyped-def]
    """audit_records copied into a schema of its own; the URL that reads the copy."""
    schema = f"tamper_{uuid.uuid4().hex[:8]}"
    _sql(postgres.url, f"CREATE SCHEMA {schema}")
    _sql(postgres.url, f"CREATE TABLE {schema}.audit_records AS SELECT * FROM public.audit_records")
    sep = "&" if "?" in postgres.url else "?"
    yield schema, f"{postgres.url}{sep}options=-csearch_path%3D{schema}"
    _sql(postgres.url, f"DROP SCHEMA {schema} CASCADE")


def _all_matched(output: str) -> bool:
    found = re.search(r"(\d+) of (\d+) checkpoints matched", output)
    return found is not None and found.group(1) == found.group(2) and int(found.group(1)) >= 2


def _verify(url: str, published) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    from marketplace.cli.main import main

    out = CliRunner().invoke(main, ["audit", "verify", "--public-key", str(published["key"]), "--database-url", url,
                                    "--checkpoints", str(published["dir"])])
    return out.exit_code, out.output


def test_an_untouched_copy_verifies_from_outside(copy, published):  # type: ignore[no-untyped-def]
    code, output = _verify(copy[1], published)
    # Every checkpoint in the store was pulled (other tests' too): each one matches.
    assert code == 0 and "audit chain valid" in output and _all_matched(output), output
    from marketplace.cli.main import main

    here = CliRunner().invoke(main, ["audit", "verify", "--public-key", str(published["key"]),
                                     "--checkpoints", str(published["dir"])])  # no source: this installation's
    assert here.exit_code == 0 and _all_matched(here.output), here.output


def test_a_tampered_record_is_named(copy, postgres, published):  # type: ignore[no-untyped-def]
    schema, url = copy
    seq = published["sizes"][0] // 2
    _sql(postgres.url, f"UPDATE {schema}.audit_records SET data = '{{\"forged\":true}}' WHERE seq = %s", seq)
    code, output = _verify(url, published)
    assert code == 1 and f"first bad seq {seq}: hash mismatch" in output, output


def test_a_deleted_tail_is_named_by_the_checkpoint_that_covered_it(copy, postgres, published):  # type: ignore[no-untyped-def]
    schema, url = copy
    last = published["sizes"][1]
    _sql(postgres.url, f"DELETE FROM {schema}.audit_records WHERE seq > %s", last - 3)
    code, output = _verify(url, published)
    assert code == 1 and f"first bad seq {last - 2}:" in output and "truncated" in output, output


def test_a_middle_rewritten_and_re_signed_with_the_platforms_key_is_caught(copy, postgres, published):  # type: ignore[no-untyped-def]
    """The operator edits a record and re-hashes and re-signs it and every record after it, with the
    real key: the chain is valid in itself; the checkpoint signed before disagrees."""
    from marketplace.audit import signing
    from marketplace.audit.hashing import record_hash

    schema, url = copy
    first, second = published["sizes"]
    target = (first + second) // 2 + 1
    rows = _sql(postgres.url, f"SELECT seq, ts, actor, action, subject, task_id, data FROM {schema}.audit_records "
                              "WHERE seq >= %s - 1 ORDER BY seq", target)
    prev = _sql(postgres.url, f"SELECT hash FROM {schema}.audit_records WHERE seq = %s", target - 1)[0][0]
    for seq, ts, actor, action, subject, task_id, data in rows[1:]:
        if seq == target:
            data = json.dumps({**json.loads(data), "forged": True}, sort_keys=True, separators=(",", ":"))
        digest = record_hash(prev_hash=prev, seq=seq, ts=ts, actor=actor, action=action, subject=subject,
                             task_id=task_id, data=data)
        _sql(postgres.url, f"UPDATE {schema}.audit_records SET data = %s, prev_hash = %s, hash = %s, signature = %s "
                           "WHERE seq = %s", data, prev, digest, signing.sign(digest), seq)
        prev = digest
    from marketplace.cli.main import main

    alone = CliRunner().invoke(main, ["audit", "verify", "--public-key", str(published["key"]),
                                      "--database-url", url])
    assert alone.exit_code == 0, alone.output  # without checkpoints nothing shows
    code, output = _verify(url, published)
    assert code == 1 and f"first bad seq {first + 1}:" in output and "rewritten" in output, output
    assert f"{first + 1}..{second}" in output


def test_receipt_proofs_come_from_the_kept_subtrees_and_are_the_full_trees_proofs(published):  # type: ignore[no-untyped-def]
    from sqlalchemy import func, select

    from marketplace.audit import merkle, service
    from marketplace.audit.checkpoints import _subtree_roots
    from marketplace.audit.models import AuditRecord, AuditTreeNode
    from marketplace.infra.db import session_scope

    service.enqueue_now([{"actor": "system", "action": "test.filler", "subject": "test:filler", "data": {"i": i},
                          "task_id": None} for i in range(600)])  # past 256 records however short the run was
    third = _checkpoint_now()
    size = third["size"]
    with session_scope() as session:
        hashes = [merkle.leaf_hash(bytes.fromhex(h)) for h in session.scalars(
            select(AuditRecord.hash).where(AuditRecord.seq <= size).order_by(AuditRecord.seq))]
        kept = session.scalar(select(func.count()).select_from(AuditTreeNode).where(AuditTreeNode.level == 8))
        assert kept == size // 256 and size >= 256, (kept, size)  # every 256 records chained, one node
        reads: list[str] = []
        from sqlalchemy import event

        engine = session.get_bind()
        listen = lambda *args: reads.append(args[2])  # noqa: E731 (conn, cursor, statement, ...)
        event.listen(engine, "before_cursor_execute", listen)
        try:
            mth = _subtree_roots(session)
            for index in sorted({0, 1, 255, 256, size // 2, size - 2, size - 1}):
                assert merkle.inclusion_proof_by_ranges(index, size, mth) == merkle.inclusion_proof(hashes, index)
        finally:
            event.remove(engine, "before_cursor_execute", listen)
        assert merkle.root_of_leaf_hashes(hashes).hex() == third["root"]
    assert reads and all("audit_records" not in r or "seq >" in r for r in reads)
