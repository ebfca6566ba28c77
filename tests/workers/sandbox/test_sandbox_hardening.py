"""Sandbox hardening: memory bounds the whole run, a seccomp filter under bwrap, no command in `ps`."""
from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
import uuid

import pytest

from tests.workers.sandbox.sandbox_support import PY, py
from workers.sandbox import ItemResult, Limits, SandboxError
from workers.sandbox.bwrap import BwrapSandbox
from workers.sandbox.cgroup import MemoryCgroups

# Four processes, each writing `share` of memory_mb and holding it until all have.
FORKS = """
import os, sys, time
share = float(sys.argv[1])
size = int(share * int(sys.argv[2]) * 2**20)
children = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        held = b"x" * size
        time.sleep(1.0)
        os._exit(0)
    children.append(pid)
ok = all(os.waitpid(pid, 0)[1] == 0 for pid in children)
sys.stdin.read()
print(int(ok), flush=True)
"""


def forks(share: float, memory_mb: int, marker: str) -> list[str]:
    return [PY, "-c", FORKS, str(share), str(memory_mb), marker]


def test_memory_mb_bounds_all_processes_together(sandbox, marker: str) -> None:  # type: ignore[no-untyped-def]
    limits = Limits(timeout_s=20, memory_mb=128)
    # 4 x 0.6 x 128 MB: each process fits its own address-space limit, the run does not.
    with pytest.raises(SandboxError, match=r"memory limit of 128 MB exceeded \(the kernel killed the run for memory\)"):
        sandbox.run(forks(0.6, 128, marker), [1], limits)
    # 4 x 0.1 x 128 MB fits.
    assert sandbox.run(forks(0.1, 128, marker), [1], limits) == [ItemResult(ok=True, value=1)]
    found = sandbox.memory_cgroups()
    assert isinstance(found, MemoryCgroups)
    mine = [e.name for e in os.scandir(found.base) if e.name.startswith(f"mp-{os.getpid()}-")]
    assert mine == []  # each run's cgroup is removed after it


def test_the_subtask_fails_naming_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from marketplace.settings import reset_settings
    from workers.executors.base import ExecContext, ExecutionError
    from workers.executors.generic import GenericExecutor

    monkeypatch.setenv("MARKETPLACE_SANDBOX", "bwrap")
    reset_settings()
    ctx = ExecContext(task_id="t1", subtask_id="s1", user_id="u1", device="cpu")
    params = {"command": forks(0.6, 128, "m")[:-1], "memory_mb": 128, "timeout_s": 20}
    try:
        with pytest.raises(ExecutionError, match="memory limit of 128 MB exceeded") as caught:
            GenericExecutor().run([1], params, ctx)
        assert caught.value.retryable is False
        assert GenericExecutor().run([1], {**params, "command": forks(0.1, 128, "m")[:-1]}, ctx) == [1]
    finally:
        reset_settings()


def test_without_cgroups_the_node_says_so_and_bounds_each_process(marker: str, caplog) -> None:  # type: ignore[no-untyped-def]
    box = BwrapSandbox(memory_cgroups="no cgroup v2 or v1 memory hierarchy here (test)")
    with caplog.at_level(logging.WARNING, logger="workers.sandbox.bwrap"):
        box.check()
    assert "memory_mb bounds each process's address space only (RLIMIT_AS), not the whole run: " \
           "no cgroup v2 or v1 memory hierarchy here (test)" in caplog.text
    assert box.hardening()["memory"] == (
        "RLIMIT_AS per process, NOT the whole run: no cgroup v2 or v1 memory hierarchy here (test)")
    # What every run was before: four processes of 0.6 x memory_mb each passed.
    assert box.run(forks(0.6, 128, marker), [1], Limits(timeout_s=20, memory_mb=128)) == [ItemResult(ok=True, value=1)]


def test_node_facts_say_how_the_sandbox_is_hardened(monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.node  # noqa: F401  (registers the sandbox fact source, as a worker does)
    from marketplace.registry.signals import extra_facts
    from marketplace.settings import reset_settings
    from workers.sandbox import cgroup, reset_sandboxes

    monkeypatch.setenv("MARKETPLACE_SANDBOX", "bwrap")
    reset_settings()
    reset_sandboxes()
    try:
        facts = extra_facts()["sandbox"]
        assert facts == {"name": "bwrap", "memory": cgroup.discover().describe(), "seccomp": "47 system calls denied"}
    finally:
        reset_settings()
        reset_sandboxes()


# --- seccomp under bwrap -------------------------------------------------------------------

SYSCALLS = """
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
# x86_64 numbers: ptrace(PTRACE_TRACEME) would succeed, the others fail some other way unfiltered.
calls = {"ptrace": (101, 0), "mount": (165, 0), "unshare": (272, 0x10000000), "setns": (308, -1),
         "keyctl": (250, 0), "bpf": (321, 0), "perf_event_open": (298, 0), "kexec_load": (246, 0),
         "reboot": (169, 0), "init_module": (175, 0), "io_uring_setup": (425, 1)}
out = {}
for name, (nr, arg) in calls.items():
    ctypes.set_errno(0)
    rc = libc.syscall(nr, arg, 0, 0, 0, 0)
    out[name] = "EPERM" if rc == -1 and ctypes.get_errno() == 1 else f"rc={rc} errno={ctypes.get_errno()}"
# Ordinary things still work: a process, a thread, a pipe, memory.
import subprocess, threading, mmap
out["ok"] = [subprocess.run(["/bin/echo", "hi"], capture_output=True).stdout.decode().strip(),
             threading.Thread(target=lambda: None).start() is None, len(mmap.mmap(-1, 4096)), os.getpid() > 0]
sys.stdin.read()
print(json.dumps(out), flush=True)
"""
DENIED = ["ptrace", "mount", "unshare", "setns", "keyctl", "bpf", "perf_event_open", "kexec_load", "reboot",
          "init_module", "io_uring_setup"]


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="system call numbers are x86_64's")
def test_seccomp_denies_the_kernels_dangerous_doors(marker: str) -> None:
    box = BwrapSandbox()
    [result] = box.run([PY, "-c", SYSCALLS, marker], [1], Limits(timeout_s=20))
    assert result.value == {**{name: "EPERM" for name in DENIED}, "ok": ["hi", True, 4096, True]}
    # Without the filter the same command gets further (ptrace(PTRACE_TRACEME) succeeds): the test sees the filter.
    traceme = "import ctypes, sys\nrc = ctypes.CDLL(None).syscall(101, 0, 0, 0, 0, 0)\nsys.stdin.read()\nprint(rc)"
    assert box.run([PY, "-c", traceme, marker], [1], Limits(timeout_s=20)) == [ItemResult(ok=True, value=-1)]
    bare = BwrapSandbox(seccomp_program="no filter (test)")
    assert bare.run([PY, "-c", traceme, marker], [1], Limits(timeout_s=20)) == [ItemResult(ok=True, value=0)]


# --- the command is not in the node's process list ---------------------------------------


def test_no_host_process_of_ours_shows_the_command(sandbox, marker: str) -> None:  # type: ignore[no-untyped-def]
    secret = f"secret-{uuid.uuid4().hex}"
    code = f"""
    import sys, time
    sys.stdin.read()
    time.sleep(2)  # {secret}
    print(1, flush=True)
    """
    outcome: list[object] = []
    runner = threading.Thread(target=lambda: outcome.append(sandbox.run(py(code, marker), [1], Limits(timeout_s=20))))
    runner.start()
    seen: dict[int, str] = {}
    running = False
    deadline = time.monotonic() + 1.8
    while time.monotonic() < deadline:
        ps = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
        for line in ps.splitlines():
            pid, _, args = line.strip().partition(" ")
            running = running or ("bwrap --args" in args or ("runsc" in args and " run " in args))
            if secret in args:
                seen[int(pid)] = args
        time.sleep(0.1)
    runner.join()
    assert outcome == [[ItemResult(ok=True, value=1)]]
    assert running  # the samples were taken while the sandbox ran
    if sandbox.name == "gvisor":  # the command runs in gVisor's kernel: no host process is it
        assert seen == {}
        return
    # Under bwrap no process of ours (setpriv, bwrap, its pid 1 inside, the shell) shows it; the
    # user's program is a host process and shows its own argv (see README, Security: hidepid).
    own_ns = os.readlink("/proc/self/ns/pid")
    for pid, args in seen.items():
        assert args.startswith(f"{PY} -c"), args
        try:
            assert os.readlink(f"/proc/{pid}/ns/pid") != own_ns, args
        except FileNotFoundError:
            pass  # it has exited since
