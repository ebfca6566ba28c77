"""The Python client and the `marketplace` client commands against a live gunicorn and a real worker."""
from __future__ import annotations

import json
import stat
import uuid

import pytest
from click.testing import CliRunner

from marketplace.cli import main
from marketplace.client import ApiError, Client


@pytest.fixture()
def account(live_api):  # type: ignore[no-untyped-def]
    email, password = f"cli-{uuid.uuid4().hex[:8]}@example.com", "cli password 123"
    Client(live_api).register(email, password)
    return email, password


@pytest.fixture()
def cli(live_api, account, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MARKETPLACE_CONFIG_DIR", str(tmp_path / "cfg"))
    runner = CliRunner()
    email, password = account
    out = runner.invoke(main, ["login", "--url", live_api, "--email", email], input=f"{password}\n")
    assert out.exit_code == 0, out.output

    def run(*args: str):  # type: ignore[no-untyped-def]
        return runner.invoke(main, list(args), catch_exceptions=False)

    return run


def test_login_keeps_tokens_in_a_0600_file(cli, tmp_path, account):  # type: ignore[no-untyped-def]
    path = tmp_path / "cfg" / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    creds = json.loads(path.read_text())
    assert creds["email"] == account[0] and creds["access_token"] and creds["refresh_token"]


def test_bad_login_fails_cleanly(live_api, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MARKETPLACE_CONFIG_DIR", str(tmp_path / "cfg"))
    out = CliRunner().invoke(main, ["login", "--url", live_api, "--email", "no@example.com", "--password", "nope"])
    assert out.exit_code != 0 and "401" in out.output
    assert not (tmp_path / "cfg" / "credentials.json").exists()


def test_submit_wait_prints_the_result_and_status_result_work(cli, worker):  # type: ignore[no-untyped-def]
    out = cli("submit", "--model", "echo", "--input", "a", "--input", "b", "--wait")
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["outputs"] == ["a", "b"] and result["model"] == "echo"
    assert "1/1" in out.stderr  # the progress bar: done/total subtasks
    task_id = result["task_id"]
    status = cli("status", task_id)
    assert status.exit_code == 0 and json.loads(status.stdout)["status"] == "Done"
    again = cli("result", task_id)
    assert json.loads(again.stdout) == result
    refused = CliRunner().invoke(main, ["cancel", task_id])
    assert refused.exit_code != 0 and "409" in refused.output


def test_submit_json_inputs_and_params_without_wait(cli, worker):  # type: ignore[no-untyped-def]
    out = cli("submit", "-m", "echo", "--json", "-i", '{"n": 1}', "-i", "2", "-p", "fail_items=[]", "--wait")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["outputs"] == [{"n": 1}, 2]


def test_file_upload_and_cancel(cli, tmp_path):  # type: ignore[no-untyped-def]
    image = tmp_path / "cat.jpg"
    image.write_bytes(b"\xff\xd8\xff" + uuid.uuid4().bytes)
    out = cli("submit", "--model", "resnet50", "--device", "gpu", "--file", str(image))
    assert out.exit_code == 0, out.output
    task = json.loads(out.stdout)
    assert task["status"] == "Created"
    cancelled = cli("cancel", task["id"])
    assert cancelled.exit_code == 0 and json.loads(cancelled.stdout)["status"] == "Cancelled"


def test_commands_need_a_login(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MARKETPLACE_CONFIG_DIR", str(tmp_path / "empty"))
    out = CliRunner().invoke(main, ["status", str(uuid.uuid4())])
    assert out.exit_code != 0 and "marketplace login" in out.output


def test_python_client_refreshes_an_expired_access_token(live_api, account, worker):  # type: ignore[no-untyped-def]
    c = Client(live_api)
    c.login(*account)
    c.token = "expired.or.garbage"  # the client swaps it through the refresh token once
    task = c.submit("echo", [1, 2, 3], batch_size=2)
    assert task["subtasks"] == 2
    assert c.wait(task["id"], timeout=60)["status"] == "Done"
    assert c.result(task["id"])["outputs"] == [1, 2, 3]
    assert [s["index"] for s in c.subtasks(task["id"])] == [0, 1]
    assert c.me()["email"] == account[0]
    c.logout()
    with pytest.raises(ApiError) as err:
        Client(live_api, c.token).me()
    assert err.value.status == 401
