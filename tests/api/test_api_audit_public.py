"""Audit for outsiders over the API: the auditor role; the verifier in a process of its own with
the public key and a URL only; receipts checked offline, failing once any byte changes."""
from __future__ import annotations

import base64
import os
import subprocess
import sys
import uuid
from pathlib import Path

import requests
from click.testing import CliRunner

from tests.support.api import register, wait_for_task

ROOT = Path(__file__).resolve().parents[2]


def _make_user(role: str) -> tuple[str, str]:
    from marketplace.infra.db import session_scope
    from marketplace.users.service import create_user

    email, password = f"{role}-{uuid.uuid4().hex[:10]}@example.com", f"{role} password 123"
    with session_scope() as session:
        create_user(session, email=email, password=password, role=role)
    return email, password


def _login(client, email: str, password: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    token = client.post("/v1/auth/login", json={"email": email, "password": password}).get_json()["access_token"]
    return {"Authorization": f"Bearer {token}"}


def _finished_task(client) -> tuple[dict, str]:  # type: ignore[no-untyped-def,type-arg]
    user = register(client)
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": [1, 2, 3]}, headers=user["headers"])
    assert resp.status_code == 202 and "receipt" not in resp.get_json()["links"]
    task_id = resp.get_json()["id"]
    assert wait_for_task(client, user["headers"], task_id, timeout=120)["status"] == "Done"
    return user, task_id


def _checkpoint_now() -> dict:  # type: ignore[type-arg]
    from marketplace.audit import checkpoints, service

    service.chain_pending()
    cp = checkpoints.write_checkpoint(force=True)
    assert cp is not None
    return cp


def test_the_auditor_role_reads_the_audit_log_and_nothing_else(client, worker):  # type: ignore[no-untyped-def]
    auditor = _login(client, *_make_user("auditor"))
    page = client.get("/v1/audit/records?limit=2", headers=auditor)  # registering, logging in: 3 records at least
    assert page.status_code == 200, page.get_json()
    body = page.get_json()
    assert [r["seq"] for r in body["records"]] == [1, 2] and body["next_after_seq"] == 2
    assert set(body["records"][0]) == {"seq", "ts", "actor", "action", "subject", "task_id", "data_json",
                                       "prev_hash", "hash", "signature"}
    assert client.get("/v1/audit/records?after_seq=2&limit=2", headers=auditor).get_json()["records"][0]["seq"] == 3
    assert client.get("/v1/audit/checkpoints").status_code == 200
    assert client.get("/v1/me", headers=auditor).get_json()["role"] == "auditor"
    for method, path in (("post", "/v1/tasks"), ("get", "/v1/tasks"), ("get", "/v1/billing/balance"),
                         ("get", "/v1/audit/verify"), ("get", "/v1/workers"), ("post", "/v1/files")):
        resp = getattr(client, method)(path, headers=auditor, json={} if method == "post" else None)
        assert resp.status_code == 403 and "auditor" in resp.get_json()["detail"], (path, resp.get_json())
    user = register(client)
    assert client.get("/v1/audit/records", headers=user["headers"]).status_code == 403
    admin = _login(client, *_make_user("admin"))
    assert client.get("/v1/audit/records?limit=1", headers=admin).status_code == 200


def _no_secrets_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), **extra}
    return env


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    return subprocess.run([sys.executable, "-m", "marketplace.cli", "audit", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_an_auditor_verifies_from_another_process_with_the_public_key_and_a_url_alone(  # type: ignore[no-untyped-def]
        live_api, client, worker, tmp_path):
    _finished_task(client)
    _checkpoint_now()
    _finished_task(client)  # records after the last checkpoint too
    _checkpoint_now()
    token = requests.post(f"{live_api}/v1/auth/login", json=dict(zip(("email", "password"), _make_user("auditor"),
                                                                       strict=True)), timeout=30).json()["access_token"]
    key = tmp_path / "audit.pem"
    key.write_bytes(requests.get(f"{live_api}/v1/audit/public-key", timeout=30).content)
    folder = tmp_path / "checkpoints"
    env = _no_secrets_env(tmp_path)
    assert not any(k.startswith("MARKETPLACE_") for k in env)

    pulled = _cli(["pull-checkpoints", "--url", live_api, str(folder)], env)
    assert pulled.returncode == 0 and len(list(folder.glob("*.json"))) >= 2, pulled.stdout + pulled.stderr
    args = ["verify", "--url", live_api, "--token", token, "--public-key", str(key), "--checkpoints", str(folder)]
    ok = _cli(args, env)
    assert ok.returncode == 0 and "audit chain valid" in ok.stdout and " checkpoints matched" in ok.stdout, \
        ok.stdout + ok.stderr
    by_url = _cli([*args[:-1], live_api], env)  # --checkpoints read from the API itself
    assert by_url.returncode == 0 and " checkpoints matched" in by_url.stdout, by_url.stdout + by_url.stderr
    # Another signing key and JWT secret in its environment change nothing: only the file is trusted.
    other = base64.b64encode(os.urandom(32)).decode()
    assert _cli(args, _no_secrets_env(tmp_path, MARKETPLACE_AUDIT_SIGNING_KEY=other,
                                      MARKETPLACE_JWT_SECRET="another secret entirely 0123456789")).returncode == 0
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from marketplace.audit.hashing import public_key_pem

    wrong = tmp_path / "wrong.pem"
    wrong.write_text(public_key_pem(Ed25519PrivateKey.generate().public_key()))
    bad = _cli(["verify", "--url", live_api, "--token", token, "--public-key", str(wrong)], env)
    assert bad.returncode == 1 and "first bad seq 1:" in bad.stdout, bad.stdout + bad.stderr
    refused = _cli(["verify", "--url", live_api, "--public-key", str(key)], env)  # no token
    assert refused.returncode == 2 and "401" in refused.stderr, refused.stdout + refused.stderr


def test_a_receipt_is_checked_offline_and_fails_once_any_byte_changes(client, worker, tmp_path):  # type: ignore[no-untyped-def]
    from marketplace.audit.hashing import load_public_key
    from marketplace.audit.verifier import receipt_problem
    from marketplace.cli.main import main

    user, task_id = _finished_task(client)
    doc = client.get(f"/v1/tasks/{task_id}", headers=user["headers"]).get_json()
    assert doc["links"]["receipt"] == f"/v1/tasks/{task_id}/receipt"
    from marketplace.audit import service

    service.chain_pending()
    pending = client.get(doc["links"]["receipt"], headers=user["headers"])
    assert pending.status_code == 202 and int(pending.headers["Retry-After"]) >= 1, pending.get_json()
    assert pending.get_json()["status"] == "pending" and pending.get_json()["seq"] >= 1
    assert client.get(doc["links"]["receipt"], headers=register(client)["headers"]).status_code == 404
    admin = _login(client, *_make_user("admin"))
    assert client.get(doc["links"]["receipt"], headers=admin).status_code == 404  # the owner's alone

    cp = _checkpoint_now()
    got = client.get(doc["links"]["receipt"], headers=user["headers"])
    assert got.status_code == 200, got.data
    raw = got.data
    receipt = got.get_json()
    assert receipt["task_id"] == task_id and receipt["record"]["action"] == "task.done"
    assert receipt["record"]["seq"] == pending.get_json()["seq"] and receipt["checkpoint"] == cp
    assert client.get(doc["links"]["receipt"], headers=user["headers"]).data == raw  # the same, always

    path, key = tmp_path / "receipt.json", tmp_path / "audit.pem"
    path.write_bytes(raw)
    key.write_bytes(client.get("/v1/audit/public-key").data)
    offline = _cli(["check-receipt", str(path), "--public-key", str(key)], _no_secrets_env(tmp_path))
    assert offline.returncode == 0 and f"task {task_id} task.done" in offline.stdout, offline.stdout + offline.stderr

    public = load_public_key(key.read_bytes())
    for i in range(len(raw)):  # every byte of it, the record's included
        assert receipt_problem(raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1:], public) is not None, i
    at = raw.index(b'"data_json"') + 20
    path.write_bytes(raw[:at] + bytes([raw[at] ^ 0x02]) + raw[at + 1:])
    changed = CliRunner().invoke(main, ["audit", "check-receipt", str(path), "--public-key", str(key)])
    assert changed.exit_code == 1 and "receipt INVALID" in changed.output, changed.output
