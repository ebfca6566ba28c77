"""The Python client and the `marketplace` client commands against a live gunicorn and a real worker."""
from __future__ import annotations

import json
import stat
import uuid

import pytest
from click.testing import CliRunner

from marketplace.cli.main import main
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


def test_a_failed_wait_points_at_the_partial_result(cli, worker):  # type: ignore[no-untyped-def]
    out = cli("submit", "-m", "echo", "-i", "ok", "-i", "bad", "--batch-size", "1", "-p", 'fail_items=["bad"]', "--wait")
    assert out.exit_code == 1 and "ended Failed" in out.output and "marketplace result --partial" in out.output
    task_id = out.output.split("marketplace result --partial ")[1].split(")")[0]
    assert json.loads(cli("result", "--partial", task_id).stdout)["outputs"] == ["ok", None]


def test_submit_json_inputs_and_params_without_wait(cli, worker):  # type: ignore[no-untyped-def]
    out = cli("submit", "-m", "echo", "--json", "-i", '{"n": 1}', "-i", "2", "-p", "fail_items=[]", "--wait")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["outputs"] == [{"n": 1}, 2]


def test_submit_reads_inputs_from_a_file_or_stdin(cli, worker, tmp_path):  # type: ignore[no-untyped-def]
    lines = tmp_path / "sentences.txt"
    lines.write_text("first line\n\nsecond, with \"quotes\"\n  third  \n", encoding="utf-8")
    out = cli("submit", "-m", "echo", "--inputs", str(lines), "-i", "flag", "--wait")
    assert out.exit_code == 0, out.output
    # blank lines skipped, the rest verbatim, after the --input items
    assert json.loads(out.stdout)["outputs"] == ["flag", "first line", 'second, with "quotes"', "  third  "]

    runner = CliRunner()
    piped = runner.invoke(main, ["submit", "-m", "echo", "--json", "-I", "-", "--wait"],
                          input='{"n": 1}\n[2, 3]\n"four"\nnull\n', catch_exceptions=False)
    assert piped.exit_code == 0, piped.output
    assert json.loads(piped.stdout)["outputs"] == [{"n": 1}, [2, 3], "four", None]


def test_a_bad_json_line_is_refused_before_anything_is_sent(cli):  # type: ignore[no-untyped-def]
    before = json.loads(cli("list", "--json", "--limit", "100").stdout)["tasks"]
    out = CliRunner().invoke(main, ["submit", "-m", "echo", "--json", "-I", "-"], input='{"n": 1}\nnot json\n')
    assert out.exit_code == 2 and "--inputs" in out.output and "line 2 is not JSON" in out.output
    assert json.loads(cli("list", "--json", "--limit", "100").stdout)["tasks"] == before


def test_list_shows_the_users_tasks_newest_first_and_pages(cli, worker):  # type: ignore[no-untyped-def]
    ids = [json.loads(cli("submit", "-m", "echo", "-i", str(n), "--wait").stdout)["task_id"] for n in range(3)]
    page = json.loads(cli("list", "--json", "--limit", "2", "--status", "Done").stdout)
    assert [t["id"] for t in page["tasks"]] == ids[:0:-1] and page["next_cursor"]
    rest = json.loads(cli("list", "--json", "--limit", "2", "--status", "Done", "--cursor", page["next_cursor"]).stdout)
    assert [t["id"] for t in rest["tasks"]] == ids[:1] and rest["next_cursor"] is None
    table = cli("list", "--limit", "2", "--status", "Done")
    assert table.exit_code == 0, table.output
    assert ids[2] in table.stdout and ids[1] in table.stdout and ids[0] not in table.stdout  # full ids, piped
    assert f"marketplace list --status Done --limit 2 --cursor {page['next_cursor']}" in table.stdout
    assert not json.loads(cli("list", "--json", "--status", "Failed").stdout)["tasks"]


def test_file_upload_and_cancel(cli, tmp_path):  # type: ignore[no-untyped-def]
    image = tmp_path / "cat.jpg"
    image.write_bytes(b"\xff\xd8\xff" + uuid.uuid4().bytes)
    out = cli("submit", "--model", "resnet50", "--device", "gpu", "--file", str(image))
    assert out.exit_code == 0, out.output
    task = json.loads(out.stdout)
    assert task["status"] == "Created"
    partial = json.loads(cli("result", "--partial", task["id"]).stdout)
    assert partial["outputs"] == [None] and partial["missing"][0]["status"] == "Pending"
    cancelled = cli("cancel", task["id"])
    assert cancelled.exit_code == 0 and json.loads(cancelled.stdout)["status"] == "Cancelled"


def test_commands_need_a_login(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MARKETPLACE_CONFIG_DIR", str(tmp_path / "empty"))
    out = CliRunner().invoke(main, ["status", str(uuid.uuid4())])
    assert out.exit_code != 0 and "marketplace login" in out.output


def test_python_client_reads_every_subtask_page_by_page(live_api, account, worker, monkeypatch):  # type: ignore[no-untyped-def]
    import marketplace.client as client_module

    client = Client(live_api)
    client.login(*account)
    task = client.submit("echo", list(range(5)), batch_size=1)
    assert client.wait(task["id"], timeout=60)["status"] == "Done"
    seen = []
    real = client_module.Client._json

    def spy(self, method, path, **kwargs):  # type: ignore[no-untyped-def]
        if path.endswith("/subtasks"):
            kwargs["params"] = {**kwargs["params"], "limit": 2}  # small pages, to walk them
            seen.append(kwargs["params"]["after"])
        return real(self, method, path, **kwargs)

    monkeypatch.setattr(client_module.Client, "_json", spy)
    assert [s["index"] for s in client.subtasks(task["id"])] == [0, 1, 2, 3, 4] and seen == [-1, 1, 3]
    assert client.subtasks(task["id"], status="Failed") == []


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


def test_an_upload_retried_after_a_token_refresh_sends_the_whole_file(live_api, account, tmp_path):  # type: ignore[no-untyped-def]
    import hashlib

    data = uuid.uuid4().bytes * 1000
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    c = Client(live_api)
    c.login(*account)
    c.token = "expired.or.garbage"  # the first try is a 401 that has read the file to its end
    uploaded = c.upload(path)
    assert uploaded["size"] == len(data) and uploaded["sha256"] == hashlib.sha256(data).hexdigest()
    assert uploaded["content_type"] == "application/octet-stream"
    image = tmp_path / "cat.jpg"
    image.write_bytes(b"\xff\xd8\xff" + data[:100])
    assert c.upload(image)["content_type"] == "image/jpeg"  # guessed from the name (always octet-stream before)


def test_credentials_follow_xdg_config_home(live_api, account, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.delenv("MARKETPLACE_CONFIG_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    email, password = account
    out = CliRunner().invoke(main, ["login", "--url", live_api, "--email", email, "--password", password])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "xdg" / "marketplace" / "credentials.json").exists()


def test_a_down_api_or_broken_credentials_are_one_line_errors(live_api, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MARKETPLACE_CONFIG_DIR", str(tmp_path / "cfg"))
    runner = CliRunner()
    for url, words in (("http://127.0.0.1:9", "ConnectionError"), ("notaurl", "No scheme supplied")):
        out = runner.invoke(main, ["login", "--url", url, "--email", "a@example.com", "--password", "x" * 8])
        assert out.exit_code == 1 and isinstance(out.exception, SystemExit), out.output
        assert f"cannot reach the API at {url}" in out.output and words in out.output
    creds = tmp_path / "cfg" / "credentials.json"
    creds.parent.mkdir()
    creds.write_text(json.dumps({"url": "http://127.0.0.1:9", "access_token": "x", "refresh_token": "y"}))
    out = runner.invoke(main, ["list"])
    assert out.exit_code == 1 and "cannot reach the API at http://127.0.0.1:9" in out.output
    for broken, words in (("{", "cannot read"), ("{}", "names no API url"), ("[]", "names no API url")):
        creds.write_text(broken)
        out = runner.invoke(main, ["status", str(uuid.uuid4())])
        assert out.exit_code == 1 and isinstance(out.exception, SystemExit), out.output
        assert words in out.output and "marketplace login" in out.output


def test_submit_refuses_bad_json_input_and_honours_max_cost(cli):  # type: ignore[no-untyped-def]
    before = json.loads(cli("list", "--json", "--limit", "100").stdout)["tasks"]
    out = CliRunner().invoke(main, ["submit", "-m", "echo", "--json", "-i", "{bad"])
    assert out.exit_code == 2 and "--input" in out.output and "is not JSON" in out.output
    out = CliRunner().invoke(main, ["submit", "-m", "echo", "-i", "a", "--max-cost", "0.0000001"])
    assert out.exit_code == 1 and "max_cost" in out.output
    assert json.loads(cli("list", "--json", "--limit", "100").stdout)["tasks"] == before


def test_a_wait_that_times_out_says_how_to_follow_the_task(cli, tmp_path):  # type: ignore[no-untyped-def]
    image = tmp_path / "cat.jpg"
    image.write_bytes(b"\xff\xd8\xff" + uuid.uuid4().bytes)
    # No GPU node here: the task waits, and so does --wait, until its timeout.
    out = CliRunner().invoke(main, ["submit", "-m", "resnet50", "--device", "gpu", "-f", str(image), "--wait",
                                    "--timeout", "0.3"])
    assert out.exit_code == 1 and isinstance(out.exception, SystemExit), out.output
    task_id = json.loads(cli("list", "--json", "--limit", "1").stdout)["tasks"][0]["id"]
    assert f"still Created after 0.3s; it goes on: marketplace status {task_id}" in out.output
    assert json.loads(cli("cancel", task_id).stdout)["status"] == "Cancelled"
    table = cli("list", "--limit", "1")
    assert "(est. " not in table.stdout  # cancelled: final, its cost alone


def test_logout_ends_the_login_and_forgets_the_credentials(cli, live_api, tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "cfg" / "credentials.json"
    creds = json.loads(path.read_text())
    creds["access_token"] = "expired.or.garbage"  # the client refreshes, then logs that session out
    path.write_text(json.dumps(creds))
    out = cli("logout")
    assert out.exit_code == 0 and "logged out" in out.output and not path.exists()
    with pytest.raises(ApiError) as err:
        Client(live_api, refresh_token=creds["refresh_token"]).refresh()
    assert err.value.status == 401
    assert cli("logout").output.strip() == "not logged in"
