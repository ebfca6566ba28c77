"""`docker`: the command runs in a throwaway container through the Docker engine.

No network, read-only root, a private tmpfs /tmp, uid 65534, no capabilities,
memory (= swap) and pids limits in the container's cgroup, one CPU, and
optionally another runtime (`runtime="runsc"` puts gVisor underneath). The
cgroup makes the memory limit cover the whole container, and the engine tells
us when its OOM killer fired.
"""
from __future__ import annotations

import logging
import selectors
import socket
import struct
import threading
import time
from typing import Any

from workers.sandbox.base import (
    SANDBOX_ENV,
    SANDBOX_UID,
    STDERR_TAIL_BYTES,
    ItemResult,
    Limits,
    Outcome,
    ProbedSandbox,
    SandboxError,
    classify_failure,
    decode_outputs,
    encode_items,
    with_tail,
)

logger = logging.getLogger(__name__)

DEFAULT_IMAGE = "python:3.11-slim"
_HEADER = struct.Struct(">BxxxL")  # the engine's stdout/stderr multiplexing frame


class DockerSandbox(ProbedSandbox):
    name = "docker"

    def __init__(self, image: str | None = None, runtime: str | None = None) -> None:
        super().__init__()
        self.image = image or DEFAULT_IMAGE
        self.runtime = runtime
        self._client: Any = None

    def _probe(self) -> str | None:
        import docker

        try:
            client = docker.from_env(timeout=10)
            client.ping()
        except docker.errors.DockerException as err:
            return f"docker: no Docker engine reachable ({err})"
        try:
            client.images.get(self.image)
        except docker.errors.ImageNotFound:
            try:
                client.images.pull(self.image)
            except docker.errors.DockerException as err:
                return f"docker: image {self.image} is not present and cannot be pulled ({err})"
        self._client = client
        try:
            results = self._run(["/bin/sh", "-c", 'read line; echo "$line"'], ["ping"], Limits(timeout_s=60))
        except SandboxError as err:
            return f"docker: a trivial command failed: {err}"
        if results != [ItemResult(ok=True, value="ping")]:
            return f"docker: a trivial command answered {results!r}"
        return None

    def _run(self, command: list[str], items: list[Any], limits: Limits) -> list[ItemResult]:
        import docker

        cpu = int(limits.cpu_limit_s) + 1
        try:
            container = self._client.containers.create(
                self.image,
                list(command),
                stdin_open=True,
                stdin_once=True,
                tty=False,
                network_mode="none",
                read_only=True,
                tmpfs={"/tmp": f"rw,nosuid,nodev,size={limits.memory_mb}m,mode=1777"},
                mem_limit=limits.memory_bytes,
                memswap_limit=limits.memory_bytes,
                nano_cpus=1_000_000_000,
                pids_limit=limits.max_procs,
                ulimits=[
                    docker.types.Ulimit(name="cpu", soft=cpu, hard=cpu),
                    docker.types.Ulimit(name="fsize", soft=limits.memory_bytes, hard=limits.memory_bytes),
                    docker.types.Ulimit(name="nofile", soft=512, hard=512),
                    docker.types.Ulimit(name="core", soft=0, hard=0),
                ],
                user=f"{SANDBOX_UID}:{SANDBOX_UID}",
                working_dir="/tmp",
                environment=SANDBOX_ENV,
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                runtime=self.runtime,
                labels={"marketplace.sandbox": "generic"},
            )
        except docker.errors.DockerException as err:
            raise SandboxError(f"sandbox: docker could not create the container: {err}") from err
        try:
            outcome = self._attach_and_wait(container, encode_items(items), limits)
        except docker.errors.DockerException as err:
            raise SandboxError(f"sandbox: docker failed to run the container: {err}") from err
        finally:
            try:
                container.remove(force=True)
            except docker.errors.DockerException:
                logger.warning("sandbox: could not remove container %s", container.id, exc_info=True)
        failure = classify_failure(outcome, limits, len(items))
        if failure:
            raise SandboxError(with_tail(failure, outcome.stderr_tail))
        return decode_outputs(outcome, len(items))

    def _attach_and_wait(self, container: Any, payload: bytes, limits: Limits) -> Outcome:
        import requests

        # Attach before start so no output is lost.
        attached = container.attach_socket(params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
        sock: socket.socket = getattr(attached, "_sock", attached)
        deadline = time.monotonic() + limits.timeout_s
        container.start()
        writer = threading.Thread(target=_feed, args=(sock, payload), daemon=True)
        writer.start()
        stdout, stderr, failure = _read_frames(sock, deadline, limits)
        if failure is None:
            try:
                status = container.wait(timeout=max(1.0, deadline - time.monotonic()))
            except requests.exceptions.RequestException:  # the command outlived the wall clock
                failure = f"sandbox: wall time limit of {limits.timeout_s:g}s exceeded"
        if failure is not None:
            container.kill()
        sock.close()
        container.reload()
        tail = bytes(stderr[-STDERR_TAIL_BYTES:]).decode("utf-8", "replace")
        if container.attrs["State"].get("OOMKilled"):
            failure = f"sandbox: memory limit of {limits.memory_mb} MB exceeded"
        if failure is not None:
            raise SandboxError(with_tail(failure, tail))
        return Outcome(returncode=int(status["StatusCode"]), stdout=bytes(stdout), stderr_tail=tail)


def _feed(sock: socket.socket, payload: bytes) -> None:
    try:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)  # with stdin_once the engine then closes the command's stdin
    except OSError:
        pass  # the command exited without reading everything; its exit status tells the rest


def _read_frames(sock: socket.socket, deadline: float, limits: Limits) -> tuple[bytearray, bytearray, str | None]:
    stdout, stderr, buffer = bytearray(), bytearray(), bytearray()
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return stdout, stderr, f"sandbox: wall time limit of {limits.timeout_s:g}s exceeded"
            if not selector.select(timeout=min(remaining, 0.2)):
                continue
            chunk = sock.recv(65536)
            if not chunk:
                return stdout, stderr, None
            buffer += chunk
            while len(buffer) >= _HEADER.size:
                stream, size = _HEADER.unpack_from(buffer)
                if len(buffer) < _HEADER.size + size:
                    break
                data = buffer[_HEADER.size : _HEADER.size + size]
                del buffer[: _HEADER.size + size]
                if stream == 2:
                    stderr += data
                    del stderr[:-STDERR_TAIL_BYTES]
                    continue
                stdout += data
                if len(stdout) > limits.max_output_bytes:
                    return stdout, stderr, f"sandbox: output exceeded {limits.max_output_bytes} bytes"
    finally:
        selector.close()
