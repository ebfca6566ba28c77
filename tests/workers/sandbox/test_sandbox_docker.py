"""The docker sandbox: clear unavailability without an engine; the real runs need one."""
from __future__ import annotations

import pytest

from workers.sandbox import ItemResult, Limits, SandboxError, SandboxUnavailable
from workers.sandbox.docker import DockerSandbox


def _engine_error() -> str | None:
    import docker

    try:
        docker.from_env(timeout=5).ping()
    except docker.errors.DockerException as err:
        return str(err)
    return None


def test_no_engine_is_reported_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(SandboxUnavailable, match=r"^docker: no Docker engine reachable \(.+\)"):
        DockerSandbox().check()


@pytest.fixture(scope="module")
def docker_sandbox() -> DockerSandbox:
    error = _engine_error()
    if error:
        pytest.skip(f"no Docker engine reachable here ({error}); the docker sandbox runs only where one is")
    box = DockerSandbox()
    box.check()
    return box


def test_runs_json_lines(docker_sandbox: DockerSandbox) -> None:
    code = "import json, sys\nfor l in sys.stdin: print(json.dumps([json.loads(l)]), flush=True)"
    results = docker_sandbox.run(["python3", "-c", code], [1, "a"], Limits(timeout_s=20))
    assert results == [ItemResult(ok=True, value=[1]), ItemResult(ok=True, value=["a"])]


def test_no_network_and_read_only(docker_sandbox: DockerSandbox) -> None:
    code = (
        "import json, socket, sys\nsys.stdin.read()\nout = []\n"
        "try:\n    socket.create_connection(('1.1.1.1', 53), timeout=2)\n    out.append('net')\n"
        "except OSError:\n    pass\n"
        "try:\n    open('/usr/x', 'w')\n    out.append('usr')\nexcept OSError:\n    pass\n"
        "open('/tmp/x', 'w').write('ok')\nprint(json.dumps(out))"
    )
    assert docker_sandbox.run(["python3", "-c", code], [1], Limits(timeout_s=20)) == [ItemResult(ok=True, value=[])]


def test_limits(docker_sandbox: DockerSandbox) -> None:
    with pytest.raises(SandboxError, match="wall time limit"):
        docker_sandbox.run(["sleep", "60"], [1], Limits(timeout_s=2))
    with pytest.raises(SandboxError, match="memory limit of 64 MB exceeded"):
        docker_sandbox.run(
            ["python3", "-c", "chunks = []\nwhile True: chunks.append(b'x' * (8 << 20))"],
            [1],
            Limits(timeout_s=20, memory_mb=64),
        )
    with pytest.raises(SandboxError, match="output exceeded 1000 bytes"):
        docker_sandbox.run(
            ["python3", "-c", "while True: print('x' * 100)"], [1], Limits(timeout_s=20, max_output_bytes=1000)
        )
