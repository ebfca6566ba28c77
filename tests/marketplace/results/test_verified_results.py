"""Verified results with real nodes: one of them lies (`tests.support.liar_node`: its `echo`
returns {"forged": item} for each item), the others are honest.

Each test runs on a database and a broker of its own, with one control node (scheduler,
results) and the compute nodes it starts; reputations are per database, so each test starts
from clean records.
"""
from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal

import pytest
from sqlalchemy import text

from tests.conftest import CONTROL
from tests.support.api import api_app, register, wait_for_task
from tests.support.env import private_broker, private_database, switched_env
from tests.support.servers import CeleryWorker
from tests.support.wait import wait_until

NODE_ENV = {"MARKETPLACE_SPOT_CHECK_RATE": "0"}


@pytest.fixture()
def market(stack) -> Iterator[None]:  # type: ignore[no-untyped-def]
    with private_database(), private_broker(), switched_env(**NODE_ENV):
        yield


@pytest.fixture()
def client(market):  # type: ignore[no-untyped-def]
    return api_app().test_client()


@pytest.fixture()
def nodes(market) -> Iterator:  # type: ignore[no-untyped-def]
    """`start(kind, queues)`: a node of `kind` (honest, liar, control), ready when it returns."""
    from marketplace.infra.redis_client import get_redis

    started: list[CeleryWorker] = []

    def start(kind: str, queues: list[str] | None = None, *, name: str | None = None, concurrency: int = 1,
              **env: str) -> CeleryWorker:
        worker = CeleryWorker(queues or (CONTROL if kind == "control" else ["cpu.generic"]),
                              name=name or f"{kind}-{uuid.uuid4().hex[:6]}", concurrency=concurrency,
                              env={**NODE_ENV, **env},
                              app="tests.support.liar_node" if kind == "liar" else "marketplace")
        started.append(worker)
        worker.wait_ready(get_redis())
        return worker

    yield start
    for worker in started:
        worker.stop()


def _db(sql: str, **params):  # type: ignore[no-untyped-def]
    from marketplace.infra.db import get_engine

    with get_engine().connect() as conn:
        return conn.execute(text(sql), params).all()


def _audit(task_id: str | None, action: str) -> list:  # type: ignore[type-arg]
    """Records of `action` (of the task, when given), chained or still pending."""
    where = "action = :a" + (" AND task_id = :t" if task_id else "")
    return _db(f"SELECT actor, subject, data FROM audit_records WHERE {where} "
               f"UNION ALL SELECT actor, subject, data FROM audit_pending WHERE {where}", a=action, t=task_id)


def _enroll_as_provider_nodes(client, hostnames: list[str]) -> str:  # type: ignore[no-untyped-def]
    """Make the running nodes a provider's, for billing (settlement pays a provider's node by its
    hostname in `nodes`). The credentialed-node path itself is covered by the providers' tests."""
    provider = register(client)
    for i, hostname in enumerate(hostnames):
        _exec("INSERT INTO nodes (id, provider_id, name, hostname, queues, public_key, secret_hash, enabled, "
              "created_at) VALUES (gen_random_uuid(), :p, :n, :h, '[\"cpu.generic\"]', :k, :k, true, now())",
              p=provider["id"], n=f"node-{i}-{uuid.uuid4().hex[:6]}", h=hostname, k="0" * 64)
    return str(provider["id"])


def _exec(sql: str, **params) -> None:  # type: ignore[no-untyped-def]
    from marketplace.infra.db import get_engine

    with get_engine().begin() as conn:
        conn.execute(text(sql), params)


def _submit(client, user, inputs, **extra):  # type: ignore[no-untyped-def]
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": inputs, "batch_size": 1, **extra},
                       headers=user["headers"])
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()


def _reputation(client, user, hostname: str) -> dict:  # type: ignore[type-arg]
    workers = client.get("/v1/workers", headers=user["headers"]).get_json()
    workers = workers.get("workers", workers) if isinstance(workers, dict) else workers
    return next(w["reputation"] for w in workers if w["hostname"] == hostname)


def test_a_lying_node_is_outvoted_earns_nothing_and_loses_solo_work(client, nodes):  # type: ignore[no-untyped-def]
    nodes("control")
    honest_a, honest_b, liar = nodes("honest"), nodes("honest"), nodes("liar")
    user = register(client)
    provider_id = _enroll_as_provider_nodes(client, [honest_a.hostname, honest_b.hostname, liar.hostname])
    inputs = [{"n": i} for i in range(6)]

    task = _submit(client, user, inputs, redundancy=3)
    assert task["subtasks"] == 18 and task["redundancy"] == 3
    doc = wait_for_task(client, user["headers"], task["id"], timeout=120)
    assert doc["status"] == "Done", doc

    # Every output is the honest nodes' (the input itself), none the liar's.
    result = client.get(f"/v1/tasks/{task['id']}/result", headers=user["headers"]).get_json()
    assert result["outputs"] == [{"n": 0}, {"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}, {"n": 5}]

    # Each subtask ran on the three nodes; the liar's replica disagreed, the others agreed.
    subs = client.get(f"/v1/tasks/{task['id']}/subtasks", headers=user["headers"]).get_json()["subtasks"]
    assert len(subs) == 6
    for sub in subs:
        runs = {r["node"]: r for r in sub["replicas"]}
        assert set(runs) == {honest_a.hostname, honest_b.hostname, liar.hostname}, sub
        assert runs[liar.hostname]["agreed"] is False
        assert runs[honest_a.hostname]["agreed"] is True and runs[honest_b.hostname]["agreed"] is True
        assert runs[honest_a.hostname]["output_sha256"] == runs[honest_b.hostname]["output_sha256"]
        assert runs[liar.hostname]["output_sha256"] != runs[honest_a.hostname]["output_sha256"]
        assert runs[liar.hostname]["provider"] == provider_id
        assert sub["worker"] in (honest_a.hostname, honest_b.hostname)

    # Earnings: one per agreeing replica, none for the liar's.
    earned = _db("SELECT st.worker, count(*) AS n FROM ledger_entries l JOIN subtasks st ON st.id = l.subtask_id "
                 "WHERE l.task_id = :t AND l.kind = 'earning' GROUP BY st.worker", t=task["id"])
    assert {r.worker: r.n for r in earned} == {honest_a.hostname: 6, honest_b.hostname: 6}

    # Its standing: 0 of 6 agreed, demoted; the honest nodes 6 of 6.
    assert _reputation(client, user, liar.hostname) == {"agreed": 0, "disagreed": 6, "score": 0.0, "demoted": True}
    honest = _reputation(client, user, honest_a.hostname)
    assert (honest["agreed"], honest["disagreed"], honest["demoted"]) == (6, 0, False)
    assert len(_audit(task["id"], "subtask.replica_disagreed")) == 6
    demoted = _audit(None, "node.demoted")
    assert [r.subject for r in demoted] == [f"node:{liar.hostname}"]

    # No solo work for it any more: a redundancy-1 job runs on the honest nodes only, though the
    # liar still takes messages from the queue (each one it is given goes back for another node).
    solo = _submit(client, user, [f"item-{i}" for i in range(10)])
    doc = wait_for_task(client, user["headers"], solo["id"], timeout=120)
    assert doc["status"] == "Done", doc
    ran_on = {r.worker for r in _db("SELECT worker FROM subtasks WHERE task_id = :t", t=solo["id"])}
    assert ran_on <= {honest_a.hostname, honest_b.hostname} and ran_on
    taken_by_liar = [r for r in _audit(solo["id"], "subtask.started") if r.actor == f"worker:{liar.hostname}"]
    assert taken_by_liar, "the liar never took a message of the solo job: the test proved nothing"
    result = client.get(f"/v1/tasks/{solo['id']}/result", headers=user["headers"]).get_json()
    assert result["outputs"] == [f"item-{i}" for i in range(10)]


def test_two_replicas_that_disagree_get_a_third_on_another_node(client, nodes):  # type: ignore[no-untyped-def]
    nodes("control")
    honest, liar = nodes("honest"), nodes("liar")
    user = register(client)
    task = _submit(client, user, ["x"], redundancy=2, params={"sleep_s": 4})
    # Both replicas run (one on each node); a third node comes while they do.
    wait_until(lambda: _db("SELECT count(*) FROM subtasks WHERE task_id = :t AND status = 'Running'",
                           t=task["id"])[0][0] == 2, timeout=60, what="both replicas running")
    tiebreak = nodes("honest")
    # They disagree: a third replica, which only the new node may run (it ran neither).
    wait_until(lambda: _db("SELECT 1 FROM subtasks WHERE task_id = :t AND replica = 2", t=task["id"]),
               timeout=60, what="a third replica")
    doc = wait_for_task(client, user["headers"], task["id"], timeout=60)
    assert doc["status"] == "Done", doc
    assert client.get(f"/v1/tasks/{task['id']}/result", headers=user["headers"]).get_json()["outputs"] == ["x"]

    runs = {r["node"]: r for r in client.get(f"/v1/tasks/{task['id']}/subtasks",
                                             headers=user["headers"]).get_json()["subtasks"][0]["replicas"]}
    assert set(runs) == {honest.hostname, liar.hostname, tiebreak.hostname}
    assert runs[tiebreak.hostname]["replica"] == 2 and runs[tiebreak.hostname]["platform_paid"] is True
    assert [runs[h]["agreed"] for h in (honest.hostname, liar.hostname, tiebreak.hostname)] == [True, False, True]
    # The owner pays the two replicas it asked for; the tie-break is the platform's.
    charges = _db("SELECT count(*) AS n FROM ledger_entries WHERE task_id = :t AND kind = 'charge'", t=task["id"])
    assert charges[0].n == 2
    added = _audit(task["id"], "subtask.replicas_added")
    assert [json.loads(r.data) for r in added] == [{"subtasks": {"0": 1}}]


def test_a_tie_that_no_live_node_can_break_fails_with_the_reason(client, nodes):  # type: ignore[no-untyped-def]
    nodes("control")
    nodes("honest"), nodes("liar")
    user = register(client)
    task = _submit(client, user, ["z"], redundancy=2)
    doc = wait_for_task(client, user["headers"], task["id"], timeout=60)
    assert doc["status"] == "Failed" and doc["error"] == (
        "2 nodes disagreed on subtask 0, and no other live node on cpu.generic can run a replica to break the tie")


def test_replicas_that_never_agree_fail_the_task_with_the_reason(client, nodes):  # type: ignore[no-untyped-def]
    bound = {"MARKETPLACE_EXTRA_REPLICAS": "0"}  # no run past the two asked for
    nodes("control", **bound)
    nodes("honest", **bound), nodes("liar", **bound)
    user = register(client)
    task = _submit(client, user, ["y"], redundancy=2)
    doc = wait_for_task(client, user["headers"], task["id"], timeout=60)
    assert doc["status"] == "Failed" and doc["error"] == (
        "2 nodes disagreed on subtask 0: no 2 of them returned the same output")
    assert _db("SELECT count(*) FROM subtasks WHERE task_id = :t", t=task["id"])[0][0] == 2


def test_spot_checks_rerun_solo_work_at_the_platforms_cost_and_count_against_a_liar(client, nodes):  # type: ignore[no-untyped-def]
    every = {"MARKETPLACE_SPOT_CHECK_RATE": "1"}  # every batch of a redundancy-1 job gets a second run
    nodes("control", **every)
    honest_a, honest_b, liar = nodes("honest", **every), nodes("honest", **every), nodes("liar", **every)
    user = register(client)
    with switched_env(**every):
        task = _submit(client, user, [f"s{i}" for i in range(8)])
    assert task["subtasks"] == 16 and task["redundancy"] == 1
    doc = wait_for_task(client, user["headers"], task["id"], timeout=120)
    assert doc["status"] == "Done", doc
    # Whoever ran each batch first, the output is the one two nodes agreed on.
    result = client.get(f"/v1/tasks/{task['id']}/result", headers=user["headers"]).get_json()
    assert result["outputs"] == ["s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7"]
    runs = _db("SELECT index, replica, worker, agreed, platform_paid FROM subtasks WHERE task_id = :t", t=task["id"])
    liar_runs = [r for r in runs if r.worker == liar.hostname]
    assert all(r.agreed is False for r in liar_runs)
    assert all(r.agreed is True for r in runs if r.worker in (honest_a.hostname, honest_b.hostname))
    by_index: dict[int, set[str]] = {}
    for r in runs:
        by_index.setdefault(r.index, set()).add(r.worker)
    assert all(len(workers) == len([r for r in runs if r.index == i]) for i, workers in by_index.items()), runs
    # The owner pays for one run of each batch; spot checks and tie-breaks are the platform's.
    charges = _db("SELECT count(*) AS n FROM ledger_entries WHERE task_id = :t AND kind = 'charge'", t=task["id"])
    assert charges[0].n == len([r for r in runs if not r.platform_paid]) == 8
    if liar_runs:
        assert _reputation(client, user, liar.hostname)["disagreed"] == len(liar_runs)


def test_a_spot_check_no_other_node_can_run_is_dropped(client, nodes):  # type: ignore[no-untyped-def]
    every = {"MARKETPLACE_SPOT_CHECK_RATE": "1"}
    nodes("control", **every)
    only = nodes("honest", **every)
    user = register(client)
    with switched_env(**every):
        task = _submit(client, user, ["a", "b", "c"])
    doc = wait_for_task(client, user["headers"], task["id"], timeout=60)
    assert doc["status"] == "Done", doc
    assert client.get(f"/v1/tasks/{task['id']}/result", headers=user["headers"]).get_json()["outputs"] == ["a", "b", "c"]
    rows = _db("SELECT replica, status, worker FROM subtasks WHERE task_id = :t ORDER BY index, replica", t=task["id"])
    assert [(r.replica, r.status, r.worker) for r in rows] == [
        (0, "Done", only.hostname), (1, "Cancelled", None)] * 3


def test_a_job_on_one_node_with_spot_checks_ends_done_whatever_order_its_runs_come_in(client, nodes):  # type: ignore[no-untyped-def]
    """`marketplace standalone` as shipped: one node, spot checks on. Its two pool processes take
    primaries and checks in any order; a check must never take its batch's place (a swap once
    handed the node a check before its primary: the primary could then run nowhere and the job
    never ended), and the last dropped check finishes the task even while a completion commits
    beside it (each saw the other open)."""
    half = {"MARKETPLACE_SPOT_CHECK_RATE": "0.5"}
    nodes("control", **half)
    only = nodes("honest", concurrency=2, **half)
    user = register(client)
    inputs = [f"x{i}" for i in range(120)]
    for _ in range(2):
        with switched_env(**half):
            task = _submit(client, user, inputs)
        assert task["subtasks"] > 120  # some batches got a spot check
        # Well inside recovery's stall deadline: the job ends by itself, not by a sweep.
        doc = wait_for_task(client, user["headers"], task["id"], timeout=60)
        assert doc["status"] == "Done", doc
        result = client.get(f"/v1/tasks/{task['id']}/result", headers=user["headers"]).get_json()
        assert result["outputs"] == inputs
        runs = _db("SELECT replica, status, worker, platform_paid FROM subtasks WHERE task_id = :t", t=task["id"])
        assert sorted({(r.replica, r.status, r.worker, r.platform_paid) for r in runs}, key=str) == sorted(
            {(0, "Done", only.hostname, False), (1, "Cancelled", None, True)}, key=str)


def test_a_task_asking_for_more_nodes_than_are_live_fails_saying_so(client, nodes):  # type: ignore[no-untyped-def]
    nodes("control")
    nodes("honest")
    user = register(client)
    task = _submit(client, user, ["a", "b"], redundancy=2)
    doc = wait_for_task(client, user["headers"], task["id"], timeout=60)
    assert doc["status"] == "Failed" and doc["error"] == "redundancy 2 needs 2 distinct nodes on cpu.generic; 1 live"


def test_replicas_go_to_nodes_of_distinct_providers_where_there_are_enough(client, nodes):  # type: ignore[no-untyped-def]
    """Two nodes of provider A and one of the operator's (the platform, a provider of its own): each
    batch's two replicas run on two providers, though A's two nodes take messages as fast as the
    operator's one."""
    nodes("control")
    names = [f"a{i}-{uuid.uuid4().hex[:6]}" for i in (1, 2)]
    provider_a = _enroll_as_provider_nodes(client, [f"{n}@{socket.gethostname()}" for n in names])  # before they start
    a1, a2, platform = nodes("honest", name=names[0]), nodes("honest", name=names[1]), nodes("honest")
    user = register(client)
    task = _submit(client, user, [f"p{i}" for i in range(8)], redundancy=2)
    doc = wait_for_task(client, user["headers"], task["id"], timeout=120)
    assert doc["status"] == "Done", doc
    result = client.get(f"/v1/tasks/{task['id']}/result", headers=user["headers"]).get_json()
    assert result["outputs"] == ["p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7"]
    subs = client.get(f"/v1/tasks/{task['id']}/subtasks", headers=user["headers"]).get_json()["subtasks"]
    assert len(subs) == 8
    for sub in subs:
        runs = sorted((r["provider"] or "", r["node"]) for r in sub["replicas"])
        # one run on the platform's node (provider null), one on either of A's
        assert [p for p, _ in runs] == ["", provider_a], sub
        assert runs[0][1] == platform.hostname and runs[1][1] in (a1.hostname, a2.hostname), sub
    assert _db("SELECT spread_providers FROM tasks WHERE id = :t", t=task["id"])[0][0] is True


def test_replicas_run_on_distinct_nodes_of_one_provider_where_there_is_no_other(client, nodes):  # type: ignore[no-untyped-def]
    nodes("control")
    names = [f"a{i}-{uuid.uuid4().hex[:6]}" for i in (1, 2)]
    provider_a = _enroll_as_provider_nodes(client, [f"{n}@{socket.gethostname()}" for n in names])
    a1, a2 = nodes("honest", name=names[0]), nodes("honest", name=names[1])
    user = register(client)
    task = _submit(client, user, ["q0", "q1", "q2", "q3"], redundancy=2)
    doc = wait_for_task(client, user["headers"], task["id"], timeout=120)
    assert doc["status"] == "Done", doc
    subs = client.get(f"/v1/tasks/{task['id']}/subtasks", headers=user["headers"]).get_json()["subtasks"]
    for sub in subs:
        assert sorted(r["node"] for r in sub["replicas"]) == sorted([a1.hostname, a2.hostname]), sub
        assert {r["provider"] for r in sub["replicas"]} == {provider_a}
    assert _db("SELECT spread_providers FROM tasks WHERE id = :t", t=task["id"])[0][0] is False


def test_solo_work_goes_to_the_better_scored_node_while_it_has_room(client, nodes):  # type: ignore[no-untyped-def]
    """A node that has disagreed (20 of 22 agreed: score 0.72, above the demotion threshold) and
    one never found disagreeing (ranked 1.0), both idle: a solo job runs on the second; while
    that one is busy, the first takes solo work."""
    nodes("control")
    good, doubtful = nodes("honest"), nodes("honest")
    _exec("INSERT INTO node_reputation (worker, agreed, disagreed, demoted, updated_at) "
          "VALUES (:w, 20, 2, false, now())", w=doubtful.hostname)
    user = register(client)

    idle = _submit(client, user, [f"i{i}" for i in range(12)])
    doc = wait_for_task(client, user["headers"], idle["id"], timeout=120)
    assert doc["status"] == "Done", doc
    ran = [r.worker for r in _db("SELECT worker FROM subtasks WHERE task_id = :t", t=idle["id"])]
    assert ran.count(good.hostname) >= 10, ran  # the doubtful node only when the good one's heartbeat said busy
    taken = [r for r in _audit(idle["id"], "subtask.started") if r.actor == f"worker:{doubtful.hostname}"]
    assert taken, "the doubtful node never took a message of the job: the test proved nothing"

    # The good node busy (its heartbeat says so): the doubtful one takes solo work. First the good
    # one idle again, in a heartbeat written after what the doubtful one read of it was stale.
    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import heartbeat_record
    from marketplace.scheduling.standing import CACHE_S

    ended = _db("SELECT extract(epoch FROM finished_at) FROM tasks WHERE id = :t", t=idle["id"])[0][0]

    def good_beat() -> dict:  # type: ignore[type-arg]
        return heartbeat_record(get_redis(), hostname=good.hostname) or {}

    wait_until(lambda: good_beat().get("running") == 0 and good_beat()["last_heartbeat"] > float(ended) + CACHE_S,
               timeout=30, what="a heartbeat of the good node, idle")
    long = _submit(client, user, ["l0", "l1", "l2"], params={"sleep_s": 4}, batch_size=3)  # one 12 s subtask
    wait_until(lambda: good_beat().get("running") == 1, timeout=30,
               what="the good node's heartbeat saying it runs the long subtask")
    # What the doubtful node cached of its queue before that heartbeat has expired (a view read just
    # before it, still "idle", would redirect the solo work to the good node's own queue).
    busy_since = float(good_beat()["last_heartbeat"])
    wait_until(lambda: time.time() > busy_since + CACHE_S, timeout=10,
               what="the doubtful node's cached view of the queue older than the busy heartbeat")
    busy = _submit(client, user, [f"b{i}" for i in range(4)], params={"sleep_s": 0.3})
    doc = wait_for_task(client, user["headers"], busy["id"], timeout=120)
    assert doc["status"] == "Done", doc
    ran = [r.worker for r in _db("SELECT worker FROM subtasks WHERE task_id = :t", t=busy["id"])]
    assert ran.count(doubtful.hostname) >= 2, ran
    assert _db("SELECT worker FROM subtasks WHERE task_id = :t", t=long["id"])[0][0] == good.hostname


def test_redundancy_is_priced_k_times_in_the_estimate_and_the_hold(client, market):  # type: ignore[no-untyped-def]
    user = register(client)
    one = _submit(client, user, ["a", "b", "c"])
    three = _submit(client, user, ["a", "b", "c"], redundancy=3)
    assert Decimal(three["estimated_cost"]) == 3 * Decimal(one["estimated_cost"])
    holds = {str(r.task_id): r.amount for r in _db("SELECT task_id, amount FROM holds")}
    assert holds[three["id"]] == 3 * holds[one["id"]]
    assert (one["subtasks"], three["subtasks"]) == (3, 9)


@pytest.mark.slow
def test_embeddings_from_two_honest_nodes_agree_under_the_tolerance(client, nodes):  # type: ignore[no-untyped-def]
    """Two nodes with different thread counts (torch sums in another order): their vectors may differ in
    the last bits, and agree under the tolerance all the same."""
    nodes("control")
    one = nodes("honest", ["cpu.embedding"], OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    two = nodes("honest", ["cpu.embedding"], OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    user = register(client)
    sentences = ["A man is playing a guitar.", "Someone is strumming a guitar.", "The stock market fell today."]
    resp = client.post("/v1/tasks", json={"model": "embedding", "inputs": sentences, "device": "cpu",
                                          "batch_size": 3, "redundancy": 2}, headers=user["headers"])
    assert resp.status_code == 202, resp.get_json()
    doc = wait_for_task(client, user["headers"], resp.get_json()["id"], timeout=300)
    assert doc["status"] == "Done", doc
    (sub,) = client.get(f"/v1/tasks/{doc['id']}/subtasks", headers=user["headers"]).get_json()["subtasks"]
    assert {r["node"] for r in sub["replicas"]} == {one.hostname, two.hostname}
    assert [r["agreed"] for r in sub["replicas"]] == [True, True]
    from marketplace.infra.storage import get_store

    keys = [r.result_key for r in _db("SELECT result_key FROM subtasks WHERE task_id = :t ORDER BY replica",
                                      t=doc["id"])]
    a, b = (json.loads(get_store().get_bytes(k)) for k in keys)
    worst = max(abs(x - y) for va, vb in zip(a, b, strict=True) for x, y in zip(va, vb, strict=True))
    assert worst <= 1e-4, worst
    outputs = client.get(f"/v1/tasks/{doc['id']}/result", headers=user["headers"]).get_json()["outputs"]
    assert [len(v) for v in outputs] == [384, 384, 384]
