"""The `generic` executor: params, sandbox choice by setting, and errors as the worker sees them."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from marketplace.settings import reset_settings
from workers.executors.base import ExecContext, ExecutionError
from workers.executors.generic import GenericExecutor
from workers.sandbox import SandboxUnavailable, get_sandbox, reset_sandboxes, sandbox_status

CTX = ExecContext(task_id="t1", subtask_id="s1", user_id="u1", device="cpu")
DOUBLE = [
    "/usr/bin/python3",
    "-c",
    "import json, sys\nfor line in sys.stdin:\n    x = json.loads(line)\n"
    "    print('oops' if x == 'bad' else json.dumps(x * 2), flush=True)",
]


@pytest.fixture()
def use_sandbox(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    def choose(name: str | None) -> None:
        if name is None:
            monkeypatch.delenv("MARKETPLACE_SANDBOX", raising=False)
        else:
            monkeypatch.setenv("MARKETPLACE_SANDBOX", name)
        reset_settings()

    yield choose
    reset_settings()


@pytest.mark.parametrize("name", ["gvisor", "bwrap"])
def test_runs_items_in_the_configured_sandbox(name: str, use_sandbox) -> None:  # type: ignore[no-untyped-def]
    use_sandbox(name)
    executor = GenericExecutor()
    executor.warmup()
    outputs = executor.run([1, "ab", "bad", [3]], {"command": DOUBLE, "timeout_s": 5}, CTX)
    assert outputs[:2] == [2, "abab"]
    assert set(outputs[2]) == {"error"} and "not valid JSON" in outputs[2]["error"]
    assert outputs[3] == [3, 3]


@pytest.mark.parametrize("name", ["gvisor", "bwrap"])
def test_a_limit_fails_the_subtask_for_good(name: str, use_sandbox) -> None:  # type: ignore[no-untyped-def]
    use_sandbox(name)
    with pytest.raises(ExecutionError, match="sandbox: wall time limit of 1s exceeded") as caught:
        GenericExecutor().run([1], {"command": ["/bin/sleep", "30"], "timeout_s": 1}, CTX)
    assert caught.value.retryable is False


@pytest.mark.parametrize("name", ["gvisor", "bwrap"])
def test_missing_output_lines_fail_the_subtask_for_good(name: str, use_sandbox) -> None:  # type: ignore[no-untyped-def]
    """Exit 0 with nothing printed was a Done subtask whose every output was an {"error": ...}."""
    use_sandbox(name)
    with pytest.raises(ExecutionError) as caught:
        GenericExecutor().run([1, 2, 3], {"command": ["/bin/true"], "timeout_s": 5}, CTX)
    assert str(caught.value) == "sandbox: the command printed 0 output lines for 3 items and exited with code 0"
    assert caught.value.retryable is False


def test_the_wall_clock_runs_out_before_celerys_soft_limit() -> None:
    """At timeout_s = the catalog's time_limit the soft limit came first, was taken for a crash and
    retried: a command that hangs ran four times (40 minutes of node time, as shipped)."""
    from marketplace.catalog import get_catalog
    from workers.executors.generic import _limits

    limit = get_catalog().time_limit("generic")
    assert _limits({"timeout_s": limit}).timeout_s == limit - 10 < limit
    assert _limits({"timeout_s": 5}).timeout_s == 5


def test_memory_param_is_the_limit(use_sandbox) -> None:  # type: ignore[no-untyped-def]
    use_sandbox("bwrap")
    hog = ["/usr/bin/python3", "-c", "import sys; sys.stdin.read(); x = b'x' * (100 << 20); print(1)"]
    assert GenericExecutor().run([1], {"command": hog, "memory_mb": 256, "timeout_s": 5}, CTX) == [1]
    with pytest.raises(ExecutionError, match="memory limit of 64 MB exceeded"):
        GenericExecutor().run([1], {"command": hog, "memory_mb": 64, "timeout_s": 5}, CTX)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "params.command must be a non-empty list of strings"),
        ({"command": []}, "params.command must be a non-empty list of strings"),
        ({"command": "echo hi"}, "params.command must be a non-empty list of strings"),
        ({"command": ["echo", ""]}, "params.command must be a non-empty list of strings"),
        ({"command": ["echo", 1]}, "params.command must be a non-empty list of strings"),
        ({"command": ["echo"], "timeout_s": 0}, "params.timeout_s must be"),
        ({"command": ["echo"], "timeout_s": 601}, "params.timeout_s must be"),
        ({"command": ["echo"], "timeout_s": "5"}, "params.timeout_s must be"),
        ({"command": ["echo"], "timeout_s": True}, "params.timeout_s must be"),
        ({"command": ["echo"], "memory_mb": 4097}, "params.memory_mb must be"),
        ({"command": ["echo"], "memory_mb": 1.5}, "params.memory_mb must be"),
    ],
)
def test_rejects_bad_params(params: dict, message: str, use_sandbox) -> None:  # type: ignore[no-untyped-def]
    use_sandbox("bwrap")
    with pytest.raises(ExecutionError, match=message) as caught:
        GenericExecutor().run([1], params, CTX)
    assert caught.value.retryable is False


def test_no_sandbox_configured_refuses(use_sandbox) -> None:  # type: ignore[no-untyped-def]
    use_sandbox(None)
    reason = "no sandbox configured (set MARKETPLACE_SANDBOX=gvisor|bwrap|docker)"
    with pytest.raises(SandboxUnavailable) as caught:
        GenericExecutor().warmup()
    assert str(caught.value) == reason
    with pytest.raises(ExecutionError, match=r"no sandbox configured") as failed:
        GenericExecutor().run([1], {"command": ["/bin/cat"]}, CTX)
    assert failed.value.retryable is False
    use_sandbox("none")
    with pytest.raises(SandboxUnavailable, match=r"no sandbox configured"):
        GenericExecutor().warmup()


def test_sandbox_status() -> None:
    assert sandbox_status(None) == (False, "no sandbox configured (set MARKETPLACE_SANDBOX=gvisor|bwrap|docker)")
    assert sandbox_status("bwrap") == (True, "bwrap sandbox ready")
    assert sandbox_status("gvisor") == (True, "gvisor sandbox ready")
    ok, why = sandbox_status("firejail")
    assert not ok and "unknown sandbox 'firejail'" in why


def test_get_sandbox_is_one_instance_per_process() -> None:
    assert get_sandbox("bwrap") is get_sandbox("bwrap")
    reset_sandboxes()
    assert get_sandbox("bwrap").name == "bwrap"
