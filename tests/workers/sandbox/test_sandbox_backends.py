"""gVisor and bubblewrap run user code correctly, isolated, and within every limit.

Each limit test checks three things: the run ends with a clear SandboxError, it
ends fast (the limits are 1-3 s), and nothing it started is still alive.
"""
from __future__ import annotations

import os
import socket
import time

import pytest

from tests.workers.sandbox.sandbox_support import ECHO, PY, py
from workers.sandbox import ItemResult, Limits, SandboxError, SandboxUnavailable
from workers.sandbox.bwrap import BwrapSandbox
from workers.sandbox.cgroup import MemoryCgroups
from workers.sandbox.gvisor import GVisorSandbox


def expect_error(sandbox, command: list[str], limits: Limits, message: str) -> str:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    with pytest.raises(SandboxError) as caught:
        sandbox.run(command, [1], limits)
    elapsed = time.monotonic() - started
    assert message in str(caught.value)
    # Other limits than the wall clock get a generous one, and must beat it.
    bound = limits.timeout_s + 3 if "wall time" in message else limits.timeout_s
    assert elapsed < bound, f"took {elapsed:.1f}s to stop"
    return str(caught.value)


def expect_error3(sandbox, command: list[str], message: str) -> str:  # type: ignore[no-untyped-def]
    """The run of `command` over three items fails, and says `message` of the command."""
    with pytest.raises(SandboxError) as caught:
        sandbox.run(command, [7, 8, 9], Limits(timeout_s=10))
    assert f"sandbox: the command {message}" in str(caught.value)
    return str(caught.value)


# --- the protocol ---------------------------------------------------------------------------


def test_transforms_json_lines_in_order(sandbox, marker: str) -> None:  # type: ignore[no-untyped-def]
    items = [1, "a", {"b": [1, 2]}, None, "ünï"]
    results = sandbox.run(py(ECHO, marker, '{"in": item}'), items, Limits(timeout_s=5))
    assert results == [ItemResult(ok=True, value={"in": item}) for item in items]


def test_big_batch_streams_without_deadlock(sandbox, marker: str) -> None:  # type: ignore[no-untyped-def]
    # Several MB each way: far more than a pipe holds, so stdin and stdout must interleave.
    items = [{"i": i, "pad": "x" * 2000} for i in range(2000)]
    results = sandbox.run(py(ECHO, marker, 'item["i"]'), items, Limits(timeout_s=10, max_output_bytes=10_000_000))
    assert [r.value for r in results] == list(range(2000))


def test_non_json_line_is_an_item_error(sandbox, marker: str) -> None:  # type: ignore[no-untyped-def]
    results = sandbox.run(py(ECHO, marker, 'item if item != 2 else float("nan")'), [1, 2, 3], Limits(timeout_s=5))
    assert results[0] == ItemResult(ok=True, value=1)
    assert not results[1].ok and "not valid JSON" in results[1].error
    assert results[2] == ItemResult(ok=True, value=3)

    results = sandbox.run([PY, "-c", "print('hello'); print(2)", marker], [1, 2], Limits(timeout_s=5))
    assert not results[0].ok and "'hello'" in results[0].error
    assert results[1] == ItemResult(ok=True, value=2)

    # A number past a float (it became Infinity in the result, which is not JSON) and nesting past
    # the parser's stack (a RecursionError, retried as a crash): item errors, like any bad line.
    lines = "print('1e999'); print('[' * 100000 + ']' * 100000); print(-2.5e3)"
    results = sandbox.run([PY, "-c", lines, marker], [1, 2, 3], Limits(timeout_s=10))
    assert not results[0].ok and "out of range" in results[0].error
    assert not results[1].ok and "nested too deeply" in results[1].error
    assert results[2] == ItemResult(ok=True, value=-2500.0)


def test_early_exit_names_code_and_stderr(sandbox, marker: str) -> None:  # type: ignore[no-untyped-def]
    code = """
    import sys
    print(sys.stdin.readline().strip(), flush=True)
    print("giving up on the rest", file=sys.stderr)
    sys.exit(3)
    """
    message = expect_error3(sandbox, py(code, marker), "printed 1 output line for 3 items and exited with code 3")
    assert "giving up on the rest" in message


def test_a_command_that_prints_nothing_fails_the_run(sandbox, marker: str) -> None:  # type: ignore[no-untyped-def]
    """A missing binary or a crash at start: the run fails with the reason (every item was an
    {"error": ...} output of a Done subtask)."""
    message = expect_error(sandbox, [PY, "-c", "import sys; print('no module x', file=sys.stderr); sys.exit(2)",
                                     marker], Limits(timeout_s=5), "printed 0 output lines for 1 item and exited with code 2")
    assert "no module x" in message
    message = expect_error(sandbox, ["/nonexistent/bin", marker], Limits(timeout_s=5), "printed 0 output lines for 1 item")
    assert "/nonexistent/bin" in message


def test_fewer_lines_than_items_fail_the_run_whatever_the_exit_code(sandbox, marker: str) -> None:  # type: ignore[no-untyped-def]
    """Nothing printed but a clean exit (a filter that drops everything, a contained fork bomb) ended
    Done, every output an {"error": ...}; each item needs its line."""
    expect_error3(sandbox, [PY, "-c", "pass", marker], "printed 0 output lines for 3 items and exited with code 0")
    expect_error3(sandbox, [PY, "-c", "print(1); print(2)", marker],
                  "printed 2 output lines for 3 items and exited with code 0")
    bomb = "import os, sys\nfor _ in range(3):\n    if os.fork() == 0: sys.exit(0)\nos.wait()"
    expect_error3(sandbox, [PY, "-c", bomb, marker], "printed 0 output lines for 3 items and exited with code 0")


def test_more_lines_than_items_fails_the_run(sandbox, marker: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SandboxError, match="printed 2 lines for 1 items"):
        sandbox.run([PY, "-c", "print(1); print(2)", marker], [1], Limits(timeout_s=5))


# --- isolation ------------------------------------------------------------------------------


def test_no_network(sandbox, marker: str) -> None:  # type: ignore[no-untyped-def]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    code = """
    import json, socket, sys
    for line in sys.stdin:
        host, port = json.loads(line)
        try:
            socket.create_connection((host, port), timeout=2).close()
            print(json.dumps("connected"), flush=True)
        except OSError as err:
            print(json.dumps(f"failed: {err}"), flush=True)
    """
    try:
        # The host's loopback (a port listening right now), a public DNS server, and a host service port.
        targets = [["127.0.0.1", port], ["1.1.1.1", 53], ["127.0.0.1", 5432]]
        results = sandbox.run(py(code, marker), targets, Limits(timeout_s=10))
    finally:
        listener.close()
    assert [r.ok for r in results] == [True, True, True]
    assert all(r.value.startswith("failed") for r in results), results


def test_only_private_tmp_is_writable(sandbox, marker: str) -> None:  # type: ignore[no-untyped-def]
    name = f"{marker}.txt"
    paths = [f"/usr/{name}", f"/etc/{name}", f"/root/{name}", f"/{name}", f"/bin/{name}", f"/tmp/{name}"]
    code = """
    import json, sys
    for line in sys.stdin:
        path = json.loads(line)
        try:
            with open(path, "w") as f:
                f.write("x")
            print(json.dumps("written"), flush=True)
        except OSError as err:
            print(json.dumps(f"refused: {err.strerror}"), flush=True)
    """
    results = sandbox.run(py(code, marker), paths, Limits(timeout_s=5))
    outcome = dict(zip(paths, (r.value for r in results), strict=True))
    assert outcome.pop(f"/tmp/{name}") == "written"
    assert all(v.startswith("refused") for v in outcome.values()), outcome
    assert not any(os.path.exists(p) for p in paths), "a sandboxed write reached the host"


def test_sees_no_host_private_dirs(sandbox, marker: str) -> None:  # type: ignore[no-untyped-def]
    code = """
    import json, os, sys
    for line in sys.stdin:
        print(json.dumps([os.path.exists(json.loads(line)), os.getuid()]), flush=True)
    """
    paths = ["/root", "/work", "/home", "/var", "/usr/bin/python3", "/etc/passwd"]
    results = sandbox.run(py(code, marker), paths, Limits(timeout_s=5))
    seen = {p: r.value for p, r in zip(paths, results, strict=True)}
    assert seen == {
        "/root": [False, 65534],
        "/work": [False, 65534],
        "/home": [False, 65534],
        "/var": [False, 65534],
        "/usr/bin/python3": [True, 65534],
        "/etc/passwd": [True, 65534],
    }


def test_no_process_inside_sees_the_workers_environment(sandbox, marker: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """bwrap is pid 1 inside, readable by the command: its environment was the worker's (the JWT
    secret, the database URL, the store's keys)."""
    monkeypatch.setenv("MARKETPLACE_JWT_SECRET", f"secret-{marker}")
    code = """
    import glob, json, sys
    for line in sys.stdin:
        found = []
        for path in glob.glob("/proc/[0-9]*/environ"):
            try:
                with open(path, "rb") as f:
                    found += [path for var in f.read().split(b"\\0") if b"MARKETPLACE_" in var]
            except OSError:
                pass
        print(json.dumps(found), flush=True)
    """
    assert sandbox.run(py(code, marker), [1], Limits(timeout_s=10)) == [ItemResult(ok=True, value=[])]


def test_no_nested_user_namespace_and_a_bounded_dev_shm(sandbox, marker: str) -> None:  # type: ignore[no-untyped-def]
    code = """
    import json, subprocess, sys
    for line in sys.stdin:
        nested = subprocess.run(["unshare", "-Ur", "true"], capture_output=True).returncode == 0
        written = 0
        try:  # one MiB at a time, up to memory_mb + 1 MiB
            with open("/dev/shm/fill", "wb") as f:
                while written <= json.loads(line):
                    f.write(b"x" * 2**20)
                    f.flush()
                    written += 2**20
        except OSError:
            pass
        print(json.dumps([nested, written]), flush=True)
    """
    limits = Limits(timeout_s=20, memory_mb=64)
    [result] = sandbox.run(py(code, marker), [0], limits)
    nested, written = result.value
    if sandbox.name == "bwrap":  # under gVisor a namespace is the sentry's, not the host kernel's
        assert nested is False  # `unshare -Ur` made the command root of a namespace of its own
    # bwrap's /dev/shm took 960 MB from a job of 64 (half the host's memory); gVisor's is read-only.
    # With a memory cgroup what /dev/shm holds is the run's memory, and the run ends for it.
    try:
        [result] = sandbox.run(py(code, marker), [limits.memory_bytes], limits)
    except SandboxError as err:
        assert "memory limit of 64 MB exceeded" in str(err)
        assert isinstance(sandbox.memory_cgroups(), MemoryCgroups)
    else:
        nested, written = result.value
        assert written <= limits.memory_bytes, written


# --- limits ---------------------------------------------------------------------------------


def test_wall_time_limit(sandbox, marker: str) -> None:  # type: ignore[no-untyped-def]
    expect_error(
        sandbox,
        [PY, "-c", "import time; time.sleep(60)", marker],
        Limits(timeout_s=1.5),
        "sandbox: wall time limit of 1.5s exceeded",
    )


def test_cpu_limit_stops_an_infinite_loop(sandbox, marker: str) -> None:  # type: ignore[no-untyped-def]
    expect_error(
        sandbox,
        [PY, "-c", "while True: pass", marker],
        Limits(timeout_s=10, cpu_s=1),
        "sandbox: CPU time limit of 1s exceeded",
    )


def test_cpu_limit_counts_every_process(sandbox, marker: str) -> None:  # type: ignore[no-untyped-def]
    # The parent only waits; four children spin. Each one's RLIMIT_CPU (2 s) is far off
    # when their sum passes 1 s, so only whole-sandbox accounting ends this early.
    code = "import os\nfor _ in range(4):\n    if os.fork() == 0:\n        while True: pass\nos.wait()"
    expect_error(
        sandbox, [PY, "-c", code, marker], Limits(timeout_s=10, cpu_s=1), "sandbox: CPU time limit of 1s exceeded"
    )


def test_memory_limit(sandbox, marker: str) -> None:  # type: ignore[no-untyped-def]
    # Memory written to, so it is really held: the cgroup counts pages, not address space.
    expect_error(
        sandbox,
        [PY, "-c", "chunks = []\nwhile True: chunks.append(b'x' * (8 << 20))", marker],
        Limits(timeout_s=10, memory_mb=64),
        "sandbox: memory limit of 64 MB exceeded (the kernel killed the run for memory)",
    )


def test_process_limit_stops_a_fork_bomb(sandbox, marker: str) -> None:  # type: ignore[no-untyped-def]
    expect_error(
        sandbox,
        [PY, "-c", "import os\nwhile True: os.fork()", marker],
        Limits(timeout_s=10, max_procs=16),
        "sandbox: process limit of 16 reached",
    )


def test_process_limit_stops_a_quiet_fork_bomb(sandbox, marker: str) -> None:  # type: ignore[no-untyped-def]
    # Swallows EAGAIN and keeps trying, so only counting the sandbox's tasks can tell.
    code = "import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.01)"
    expect_error(
        sandbox, [PY, "-c", code, marker], Limits(timeout_s=10, max_procs=16), "sandbox: process limit of 16 reached"
    )


def test_threads_under_the_process_limit_run(sandbox, marker: str) -> None:  # type: ignore[no-untyped-def]
    code = """
    import threading, time
    threads = [threading.Thread(target=time.sleep, args=(0.3,)) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print(len(threads))
    """
    assert sandbox.run(py(code, marker), [1], Limits(timeout_s=5, max_procs=16)) == [ItemResult(ok=True, value=8)]


def test_output_limit(sandbox, marker: str) -> None:  # type: ignore[no-untyped-def]
    code = "import sys\nwhile True: sys.stdout.write('x' * 65536)"
    expect_error(
        sandbox,
        [PY, "-c", code, marker],
        Limits(timeout_s=10, max_output_bytes=100_000),
        "sandbox: output exceeded 100000 bytes",
    )


# --- availability ---------------------------------------------------------------------------


def test_missing_binary_is_unavailable() -> None:
    with pytest.raises(SandboxUnavailable, match="/nonexistent/bwrap not found"):
        BwrapSandbox("/nonexistent/bwrap").check()
    with pytest.raises(SandboxUnavailable, match="/nonexistent/runsc not found"):
        GVisorSandbox("/nonexistent/runsc").check()
