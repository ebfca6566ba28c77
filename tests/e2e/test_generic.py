"""User code end to end: REST → a real worker → the sandbox, and the node survives hostile code."""
from __future__ import annotations

import pytest

from tests.support.api import register, wait_for_task

DOUBLE = ["/usr/bin/python3", "-c",
          "import sys, json\nfor line in sys.stdin:\n    print(json.dumps(json.loads(line) * 2), flush=True)"]


@pytest.fixture()
def user(client, worker):  # type: ignore[no-untyped-def]
    return register(client)


def _run(client, user, command, inputs, **params):  # type: ignore[no-untyped-def]
    resp = client.post("/v1/tasks", json={"model": "generic", "inputs": inputs, "device": "cpu",
                                          "params": {"command": command, **params}}, headers=user["headers"])
    assert resp.status_code == 202, resp.get_json()
    return wait_for_task(client, user["headers"], resp.get_json()["id"], timeout=120)


def test_user_code_runs_in_the_sandbox_and_hostile_code_is_stopped(client, user):  # type: ignore[no-untyped-def]
    doc = _run(client, user, DOUBLE, [1, "ab", [3]])
    assert doc["status"] == "Done", doc
    assert client.get(f"/v1/tasks/{doc['id']}/result", headers=user["headers"]).get_json()["outputs"] == [2, "abab", [3, 3]]

    loop = _run(client, user, ["/usr/bin/python3", "-c", "while True: pass"], [1], timeout_s=2)
    assert loop["status"] == "Failed" and "limit" in loop["error"], loop["error"]
    bomb = _run(client, user, ["/usr/bin/python3", "-c", "import os\nwhile True: os.fork()"], [1], timeout_s=3)
    assert bomb["status"] == "Failed" and "limit" in bomb["error"], bomb["error"]

    # The node is still healthy: the next job runs normally.
    again = _run(client, user, DOUBLE, [21])
    assert again["status"] == "Done"
    assert client.get(f"/v1/tasks/{again['id']}/result", headers=user["headers"]).get_json()["outputs"] == [42]


def test_every_item_needs_its_output_line_whatever_the_exit_code(client, user):  # type: ignore[no-untyped-def]
    """A command that exits 0 having printed nothing (`true`, a contained fork bomb) ended Done, every
    output an {"error": ...}; it fails its subtask with the reason, at its first attempt: the same
    command would print the same again."""
    quiet = _run(client, user, ["/bin/true"], [1, 2, 3])
    assert quiet["status"] == "Failed", quiet
    assert "the command printed 0 output lines for 3 items and exited with code 0" in quiet["error"], quiet["error"]
    bomb = "import os, sys\nfor _ in range(8):\n    if os.fork() == 0: sys.exit(0)\nos.wait()"
    short = _run(client, user, ["/usr/bin/python3", "-c", bomb], [1, 2, 3])
    assert short["status"] == "Failed", short
    assert "printed 0 output lines for 3 items and exited with code 0" in short["error"], short["error"]
    for doc in (quiet, short):
        [subtask] = client.get(f"/v1/tasks/{doc['id']}/subtasks", headers=user["headers"]).get_json()["subtasks"]
        assert (subtask["status"], subtask["attempts"]) == ("Failed", 1), subtask
