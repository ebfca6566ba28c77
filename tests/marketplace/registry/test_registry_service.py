"""Worker registry service: facts parsing, the durable table, listing and the catalog view."""
from __future__ import annotations

import time
import uuid

import pytest

from marketplace.registry.facts import memory_bytes, node_facts, parse_nvidia_smi


def test_nvidia_smi_rows_are_parsed():
    out = "NVIDIA H100 80GB HBM3, 81559 MiB\nTesla T4, 15360 MiB\n\n"
    assert parse_nvidia_smi(out) == [
        {"name": "NVIDIA H100 80GB HBM3", "memory_bytes": 81559 * 1024 * 1024},
        {"name": "Tesla T4", "memory_bytes": 15360 * 1024 * 1024},
    ]
    assert parse_nvidia_smi("Odd GPU, [N/A]") == [{"name": "Odd GPU", "memory_bytes": None}]


def test_node_facts_describe_this_machine(tmp_path):
    facts = node_facts()
    assert facts["cpu_count"] >= 1 and facts["memory_bytes"] > 0
    assert facts["gpu_count"] == len(facts["gpus"])
    fake = tmp_path / "meminfo"
    fake.write_text("MemTotal:       24684092 kB\nMemFree: 1 kB\n")
    assert memory_bytes(str(fake)) == 24684092 * 1024
    assert memory_bytes(str(tmp_path / "missing")) is None


@pytest.fixture()
def hostname(redis_client):  # type: ignore[no-untyped-def]
    name = f"unit-{uuid.uuid4().hex[:8]}@test"
    yield name
    redis_client.delete(f"marketplace:worker:{name}")


def _info(hostname: str, **extra):  # type: ignore[no-untyped-def]
    return {"hostname": hostname, "queues": ["cpu.generic"], "models": ["echo", "generic"], "concurrency": 2,
            "running": 1, "unavailable": {"generic": "no sandbox"}, "facts": {"cpu_count": 2}, **extra}


def test_online_then_expired_then_swept(stack, redis_client, hostname):  # type: ignore[no-untyped-def]
    from marketplace.infra.db import session_scope
    from marketplace.registry.models import Worker
    from marketplace.registry.service import heartbeat, list_workers, record_online, sweep

    with session_scope() as session:
        record_online(session, info=_info(hostname))
    heartbeat(redis_client, info=_info(hostname))
    with session_scope() as session:
        mine = [w for w in list_workers(session, r=redis_client, viewer=None) if w["hostname"] == hostname]
        assert len(mine) == 1
        assert mine[0] | {"last_heartbeat": None} == {
            "hostname": hostname, "queues": ["cpu.generic"], "models": ["echo", "generic"], "status": "online",
            "capacity": 2, "running": 1, "free": 1, "last_heartbeat": None,
            "unavailable": {"generic": "no sandbox"}, "facts": {"cpu_count": 2}, "provider": None, "node": None,
            "reputation": {"agreed": 0, "disagreed": 0, "score": 0.0, "demoted": False},  # no replica judged yet
        }
        assert hostname in sweep(session, r=redis_client)["refreshed"]

    redis_client.delete(f"marketplace:worker:{hostname}")  # what a missed TTL does
    with session_scope() as session:
        mine = [w for w in list_workers(session, r=redis_client, viewer=None) if w["hostname"] == hostname]
        assert mine[0]["status"] == "offline" and mine[0]["capacity"] == 0
        assert mine[0]["unavailable"] == {"generic": "no sandbox"} and "unavailable" not in mine[0]["facts"]
        assert hostname in sweep(session, r=redis_client)["offline"]
    with session_scope() as session:
        row = session.get(Worker, hostname)
        assert row.status == "offline" and row.deregistered_at is not None
        assert hostname not in sweep(session, r=redis_client)["offline"]  # once only
        assert not [w for w in list_workers(session, r=redis_client, viewer=None, status="online")
                    if w["hostname"] == hostname]

    # The same hostname coming back is one row again, online, with the departure cleared.
    with session_scope() as session:
        record_online(session, info=_info(hostname, concurrency=4))
    with session_scope() as session:
        row = session.get(Worker, hostname)
        assert (row.status, row.deregistered_at, row.concurrency) == ("online", None, 4)


def test_sweep_records_a_live_node_the_table_never_saw(stack, redis_client, hostname):  # type: ignore[no-untyped-def]
    from marketplace.infra.db import session_scope
    from marketplace.registry.models import Worker
    from marketplace.registry.service import heartbeat, sweep

    heartbeat(redis_client, info=_info(hostname))
    with session_scope() as session:
        assert hostname in sweep(session, r=redis_client)["refreshed"]
    with session_scope() as session:
        row = session.get(Worker, hostname)
        assert row.status == "online" and row.queues == ["cpu.generic"]
        assert abs(row.last_heartbeat.timestamp() - time.time()) < 60


def test_catalog_counts_live_workers_per_queue_and_skips_refusals(stack, redis_client, hostname):  # type: ignore[no-untyped-def]
    from marketplace.registry.service import catalog_entries, heartbeat, live_workers

    heartbeat(redis_client, info=_info(hostname))
    mine = [w for w in live_workers(redis_client) if w["hostname"] == hostname]
    before = {m["name"]: m["live_workers"] for m in catalog_entries(r=redis_client)}
    redis_client.delete(f"marketplace:worker:{hostname}")
    after = {m["name"]: m["live_workers"] for m in catalog_entries(r=redis_client)}
    assert mine and before["echo"]["cpu.generic"] == after["echo"]["cpu.generic"] + 1
    assert before["generic"]["cpu.generic"] == after["generic"]["cpu.generic"]  # it refuses generic

    entry = next(m for m in catalog_entries(r=redis_client) if m["name"] == "embedding")
    assert entry["devices"] == ["gpu", "cpu"] and entry["queues"] == ["gpu.embedding", "cpu.embedding"]
    assert entry["price"]["gpu"] == {"start_fee": "0.002", "per_second": "0.01", "per_item": "0.00002",
                                     "failed": "start_fee"}
    assert entry["input"] == "text" and entry["batch_size"] == 64
    assert set(entry["params_schema"]["properties"]) == {"encode_batch_size", "normalize"}
    generic = next(m for m in catalog_entries(r=redis_client) if m["name"] == "generic")
    assert generic["params_schema"]["required"] == ["command"]
    assert generic["params_schema"]["additionalProperties"] is False


def test_live_workers_come_from_the_index_and_expired_nodes_leave_it(stack, redis_client, monkeypatch):  # type: ignore[no-untyped-def]
    from marketplace.registry import service
    from marketplace.settings import get_settings

    monkeypatch.setattr(get_settings(), "heartbeat_ttl", 0.3)
    short, steady = f"short-{uuid.uuid4().hex[:6]}@test", f"steady-{uuid.uuid4().hex[:6]}@test"
    service.heartbeat(redis_client, info={"hostname": short, "queues": ["cpu.generic"], "concurrency": 1})
    monkeypatch.setattr(get_settings(), "heartbeat_ttl", 30.0)
    service.heartbeat(redis_client, info={"hostname": steady, "queues": ["cpu.generic"], "concurrency": 1})
    # Unrelated keys (task results, queues) do not matter: the index is read, never the keyspace.
    redis_client.mset({f"celery-task-meta-{uuid.uuid4()}": "{}" for _ in range(200)})
    names = {w["hostname"] for w in service.live_workers(redis_client)}
    assert {short, steady} <= names
    time.sleep(0.5)
    names = {w["hostname"] for w in service.live_workers(redis_client)}
    assert steady in names and short not in names
    members = {m.decode() for m in redis_client.smembers(service.INDEX_KEY)}
    assert short not in members and steady in members
    service.deregister(redis_client, hostname=steady)
    assert steady not in {w["hostname"] for w in service.live_workers(redis_client)}


def test_live_workers_are_read_in_one_round_trip(stack, redis_client, redis_round_trips):  # type: ignore[no-untyped-def]
    from marketplace.registry import service

    names = [f"node-{i}-{uuid.uuid4().hex[:6]}@test" for i in range(3)]
    for i, name in enumerate(names):
        service.heartbeat(redis_client, info={"hostname": name, "queues": ["cpu.generic"], "concurrency": i + 1})
    redis_round_trips.clear()
    live = {w["hostname"]: w for w in service.live_workers(redis_client)}
    assert len(redis_round_trips) == 1
    assert [live[name]["concurrency"] for name in names] == [1, 2, 3]
    for name in names:
        service.deregister(redis_client, hostname=name)
