"""Where a verified task's replicas go: each to a distinct node, through Celery's per-node queues.

A shared queue hands a message to whichever of its consumers asks first, so two replicas of one
batch would often reach the same node, which may not run both (`lifecycle.statements.ELIGIBLE`).
Each operator's node also consumes its own queue (`<hostname>.dq2`, Celery's `worker_direct`):
the fair dispatcher's release (`dispatch._publish_all`) sends a verified task's replicas there,
replica r of batch i to the (i + r)-th of the queue's live nodes, distinct for the k replicas of a
batch. The slots they take are counted as any sent subtask's (`dispatch._broker_depth` reads
these lists too). A message a node may not run after all (a tie-break, a node that left) is
redirected by its claim (`redirect`) to the best-scored node that may run it.

Credentialed nodes have no per-node queue (their broker user reaches their queues only): they get
verified work from the shared queue, where a claim that may not run there trades its batch with
another never-run one of the task (`lifecycle.work._swap`) or goes back to the queue.

Distinct providers: where the queue has live nodes of at least k providers (the operator's nodes
count as one, the platform), a batch's k replicas go to k providers (`tasks.spread_providers`, set
here at each release; a claim that finds them gone clears it). Such a task stays on the shared
queue, and a claim of a replica whose batch a node of the same provider runs or ran is refused
like a claim of a second replica on one node: a swap, a redirect, or back to the queue.
"""
from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import text

from marketplace.infra.db import get_engine
from marketplace.scheduling import standing
from marketplace.tasks.lifecycle.statements import MARK_SPREAD, spread_short

logger = logging.getLogger(__name__)


def direct_nodes(queue: str) -> list[str]:
    """The live operator's nodes consuming `queue`, by name (cached a moment per process)."""
    return [n.hostname for n in standing.queue_nodes(queue) if n.provider == standing.PLATFORM]


def direct_lists(queue: str) -> list[str]:
    """The per-node queues of `queue`'s nodes (their waiting messages take slots too)."""
    from celery.utils.nodenames import worker_direct

    return [worker_direct(h).name for h in direct_nodes(queue)]


def place(queue: str, sent: dict[str, list[tuple[str, int, int]]]) -> dict[tuple[str, Any], list[str]]:
    """(task, where) -> message ids of a release: the queue, or a node's own queue for each replica
    of a verified task (redundancy > 1) where the queue has enough such nodes. A task whose replicas
    go to distinct providers stays on the shared queue: the operator's nodes are one provider, and
    the claims spread the replicas (`lifecycle.statements.ELIGIBLE`)."""
    from celery.utils.nodenames import worker_direct

    out: dict[tuple[str, Any], list[str]] = {}
    replicated = [t for t, rows in sent.items() if any(replica for _, _, replica in rows)]
    verified: set[str] = set()
    nodes: list[str] = []
    if replicated:
        # One fresh read of the queue's nodes for both: the spread is a lasting decision.
        providers = standing.providers(queue, fresh=True)
        nodes = direct_nodes(queue)
        with get_engine().begin() as conn:
            rows = conn.execute(MARK_SPREAD, {"ids": "{" + ",".join(replicated) + "}", "providers": providers}).all()
        # Only where there are k such nodes: with fewer, the shared queue and the claims' swaps.
        verified = {t for t, k, spread in rows if not spread and 2 <= k <= len(nodes)}
    targets = {h: worker_direct(h) for h in nodes}
    for task_id, rows in sent.items():
        for mid, index, replica in rows:
            if task_id in verified:
                host = nodes[(index + replica) % len(nodes)]
                out.setdefault((task_id, targets[host]), []).append(mid)
            else:
                out.setdefault((task_id, queue), []).append(mid)
    return out


# -- a claim that may not run here goes to a node that may ---------------------------------------------

_REDIRECT_FACTS = text(f"""
    SELECT t.queue, t.model, t.trace_id, s.task_id,
           (t.redundancy = 1 AND s.replica = 0) AS solo,
           -- the operator's nodes (one provider) may not run it: one of them ran a replica of a spread batch
           ({spread_short("s")}
            AND EXISTS (SELECT 1 FROM subtasks o WHERE o.task_id = s.task_id AND o.index = s.index AND o.id <> s.id
                        AND o.worker IS NOT NULL AND NOT EXISTS (SELECT 1 FROM nodes n WHERE n.hostname = o.worker))
           ) AS platform_ran,
           ARRAY(SELECT o.worker FROM subtasks o WHERE o.task_id = s.task_id AND o.index = s.index
                 AND o.id <> s.id AND o.worker IS NOT NULL) AS ran_on
    FROM subtasks s JOIN tasks t ON t.id = s.task_id
    WHERE s.id = :id AND s.status = 'Pending' AND t.status IN ('Scheduled', 'InProgress')
""")
_STANDING = text("""
    SELECT h AS worker, COALESCE(r.demoted, false) AS demoted, COALESCE(r.agreed, 0) AS agreed,
           COALESCE(r.disagreed, 0) AS disagreed
    FROM unnest(CAST(:names AS text[])) AS h LEFT JOIN node_reputation r ON r.worker = h
""")


def redirect_target(subtask_id: str, *, refused_by: str) -> tuple[Any, str] | None:
    """Where a subtask that `refused_by` may not run may go: (its facts, the best-scored live node
    that may run it (`standing.preference`), then the freest), or None where none is live, or where
    the operator's nodes may not run it (its batch spreads over providers and one of them ran a
    replica). `dispatch.redirect` sends it."""
    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import live_workers, serves

    with get_engine().connect() as conn:
        facts = conn.execute(_REDIRECT_FACTS, {"id": subtask_id}).first()
    if facts is None or not facts.queue or facts.platform_ran:
        return None
    excluded = {refused_by, *facts.ran_on}
    allowed = set(direct_nodes(facts.queue)) - excluded
    live = [w for w in live_workers(get_redis()) if w.get("hostname") in allowed
            and serves(w, facts.queue, facts.model)]
    if not live:
        return None
    with get_engine().connect() as conn:
        records = {r.worker: r for r in conn.execute(_STANDING, {"names": [w["hostname"] for w in live]})}
    candidates = []
    for w in live:
        rec = records[w["hostname"]]
        if facts.solo and rec.demoted:
            continue
        score = standing.preference(rec.agreed, rec.disagreed)
        free = int(w.get("concurrency") or 1) - int(w.get("running") or 0)
        candidates.append((score, free, w["hostname"]))
    return (facts, max(candidates)[2]) if candidates else None


_NEEDS = text("""
    SELECT t.id, t.queue, t.model, t.redundancy FROM subtasks s JOIN tasks t ON t.id = s.task_id
    WHERE s.id = :id AND t.redundancy > 1 AND t.status IN ('Scheduled', 'InProgress')
""")


def short_of_nodes(subtask_id: str) -> tuple[str, str] | None:
    """(task id, why) where the subtask's verified task asks for more distinct nodes than its queue
    has live: its replicas could never all run. None otherwise (or when the registry cannot say)."""
    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import live_workers, serves

    with get_engine().connect() as conn:
        row = conn.execute(_NEEDS, {"id": subtask_id}).first()
    if row is None or not row.queue:
        return None
    try:
        live = [w for w in live_workers(get_redis()) if serves(w, row.queue, row.model)]
    except Exception:
        return None
    if len(live) >= row.redundancy:
        return None
    return str(row.id), (f"redundancy {row.redundancy} needs {row.redundancy} distinct nodes on {row.queue}; "
                         f"{len(live)} live")


def fail_if_short(subtask_id: str) -> bool:
    """`short_of_nodes`, and then its task Failed with the reason (under the task's lock); whether it failed."""
    short = short_of_nodes(subtask_id)
    if short is None:
        return False
    from marketplace.infra.db import session_scope
    from marketplace.tasks.lifecycle import fail_task, lock_task

    task_id, reason = short
    with session_scope() as session:
        task = lock_task(session, task_id)
        if task is None:
            return False
        fail_task(session, task=task, error=reason)
    return True
