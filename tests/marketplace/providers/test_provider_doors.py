"""The other doors to a provider's nodes: `marketplace users set --provider`, `marketplace nodes`
against a live API, and gRPC WorkerService EnrollNode / ListNodes / DisableNode / RotateNode."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import uuid

import grpc
import pytest
from click.testing import CliRunner

from marketplace.cli.main import main
from tests.support.servers import ROOT, free_port, wait_port


@pytest.fixture(scope="module")
def live_api(control_plane):  # type: ignore[no-untyped-def]
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "marketplace.cli", "api", "--port", str(port), "--workers", "1", "--threads", "2"],
        cwd=ROOT, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        wait_port(port, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


def test_the_command_line_enrolls_lists_rotates_and_disables(live_api, tmp_path, monkeypatch):
    from marketplace.client import Client

    monkeypatch.setenv("MARKETPLACE_CONFIG_DIR", str(tmp_path / "cfg"))
    email, password = f"seller-{uuid.uuid4().hex[:8]}@example.com", "correct horse battery"
    Client(live_api).register(email, password)
    runner = CliRunner()
    assert runner.invoke(main, ["login", "--url", live_api, "--email", email], input=f"{password}\n").exit_code == 0

    refused = runner.invoke(main, ["nodes", "enroll", "--name", "box"])
    assert refused.exit_code != 0 and "provider role" in refused.output, refused.output
    out = runner.invoke(main, ["users", "set", email, "--provider"])
    assert out.exit_code == 0 and "provider=True" in out.output, out.output

    name = f"box-{uuid.uuid4().hex[:6]}"
    cred = tmp_path / "box.json"
    out = runner.invoke(main, ["nodes", "enroll", "--name", name, "-Q", "cpu.generic", "-o", str(cred)])
    assert out.exit_code == 0, out.output
    assert f"marketplace worker --credentials {cred} -Q cpu.generic" in out.output
    assert stat.S_IMODE(cred.stat().st_mode) == 0o600
    first = json.loads(cred.read_text())
    assert first["name"] == name and first["queues"] == ["cpu.generic"] and first["node_secret"]

    listed = json.loads(runner.invoke(main, ["nodes", "list", "--json"]).output)
    assert [(n["name"], n["enabled"]) for n in listed] == [(name, True)]
    out = runner.invoke(main, ["nodes", "rotate", name, "-o", str(cred)])
    assert out.exit_code == 0, out.output
    assert json.loads(cred.read_text())["node_secret"] != first["node_secret"]
    out = runner.invoke(main, ["nodes", "disable", name])
    assert out.exit_code == 0 and "disabled" in out.output
    earnings = json.loads(runner.invoke(main, ["nodes", "earnings"]).output)
    assert earnings["total"] == "0.000000" and earnings["share"] == "0.8"


def test_grpc_worker_service_manages_a_providers_nodes(control_plane, stack):
    from marketplace.infra.db import session_scope
    from marketplace.pb.user import user_pb2, user_pb2_grpc
    from marketplace.pb.worker import worker_pb2, worker_pb2_grpc
    from marketplace.users.service import create_user, update_user

    email, password = f"g-{uuid.uuid4().hex[:8]}@example.com", "correct horse battery"
    with session_scope() as session:
        create_user(session, email=email, password=password)
    with grpc.insecure_channel(control_plane["grpc"]) as channel:
        token = user_pb2_grpc.UserServiceStub(channel).Authenticate(
            user_pb2.AuthenticateRequest(email=email, password=password)).access_token
        md = (("authorization", f"Bearer {token}"),)
        workers = worker_pb2_grpc.WorkerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            workers.EnrollNode(worker_pb2.EnrollNodeRequest(name="nope"), metadata=md)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with session_scope() as session:
            update_user(session, email=email, actor="test", changes={"provider": True})
        with pytest.raises(grpc.RpcError) as err:
            workers.EnrollNode(worker_pb2.EnrollNodeRequest(name="Bad Name"), metadata=md)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        fields = dict(err.value.trailing_metadata())["error-fields"]
        assert json.loads(fields)[0]["field"] == "name"

        name = f"g-{uuid.uuid4().hex[:6]}"
        enrolled = workers.EnrollNode(worker_pb2.EnrollNodeRequest(name=name, queues=["cpu.generic"]), metadata=md)
        credential = json.loads(enrolled.credential_json)
        assert enrolled.node.name == name and credential["public_key"] == enrolled.node.public_key
        assert credential["grpc_address"] == control_plane["grpc"]
        assert [n.name for n in workers.ListNodes(worker_pb2.ListNodesRequest(), metadata=md).nodes] == [name]
        rotated = workers.RotateNode(worker_pb2.RotateNodeRequest(name=name), metadata=md)
        assert json.loads(rotated.credential_json)["node_secret"] != credential["node_secret"]
        assert not workers.DisableNode(worker_pb2.DisableNodeRequest(name=name), metadata=md).node.enabled
        with pytest.raises(grpc.RpcError) as err:  # a disabled node gets no new credential
            workers.RotateNode(worker_pb2.RotateNodeRequest(name=name), metadata=md)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
