"""Verified results: judge a batch's replicas against each other and pick the quorum's output.

A task with `redundancy` k runs each batch on k distinct nodes (k rows of one index, `replica`
0..k-1); a redundancy-1 task's spot-checked batch runs on two. When every run is final, the
aggregator (`results.service.finalize_task`) asks `judge`: per batch, the replicas are grouped by
agreement (per model, `agree`), and the largest group wins if it has a quorum (a majority of the
batch's planned runs, counted in distinct nodes). Short of one, more replicas run (at the
platform's cost), up to `MARKETPLACE_EXTRA_REPLICAS` past the plan; then the task fails with the
reason. The verdict is recorded in the task's final transaction (`record`): each replica's
`agreed`, its node's reputation (`registry.reputation`), an audit record for each replica that
disagreed, and a `SubTaskVerified` event per judged batch.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from marketplace.audit import service as audit
from marketplace.events.outbox import emit_many
from marketplace.settings import get_settings

# Agreement of floating-point outputs computed on different hardware (BOINC's "fuzzy" validators).
EMBEDDING_ABS_TOL = 1e-4
EMBEDDING_MIN_COSINE = 0.9999
RESNET50_SCORE_TOL = 1e-3


def _embedding_agree(a: Any, b: Any) -> bool:
    if not isinstance(a, list) or not isinstance(b, list) or len(a) != len(b):
        return False
    dot = na = nb = 0.0
    for x, y in zip(a, b, strict=True):
        if not isinstance(x, (int, float)) or not isinstance(y, (int, float)) or abs(x - y) > EMBEDDING_ABS_TOL:
            return False
        dot, na, nb = dot + x * y, na + x * x, nb + y * y
    if na == 0.0 or nb == 0.0:
        return na == nb
    return dot / math.sqrt(na * nb) >= EMBEDDING_MIN_COSINE


def _top(item: Any) -> list[Any]:
    """A resnet50 item's ranked classes (a list of {label, index, score}, or {"top": [...]})."""
    if isinstance(item, dict):
        item = item.get("top") or item.get("labels") or item.get("predictions") or []
    return item if isinstance(item, list) else []


def _resnet50_agree(a: Any, b: Any) -> bool:
    ta, tb = _top(a), _top(b)
    if not ta or not tb or ta[0].get("index") != tb[0].get("index"):
        return False
    scores_b = {c.get("index"): c.get("score") for c in tb if isinstance(c, dict)}
    for c in ta:
        other = scores_b.get(c.get("index"))
        if other is not None and abs(float(c.get("score") or 0) - float(other)) > RESNET50_SCORE_TOL:
            return False
    return True


_ITEM_AGREE = {"embedding": _embedding_agree, "resnet50": _resnet50_agree}


def agree(model: str, a: list[Any], b: list[Any]) -> bool:
    """Whether two runs' outputs of one batch agree: exact JSON equality (`echo`, `generic`, any
    model without a tolerance), element-wise tolerance for `embedding` (|a - b| <= 1e-4 and
    cosine >= 0.9999 per item), the same top-1 class and scores within 1e-3 for `resnet50`."""
    if len(a) != len(b):
        return False
    item_agree = _ITEM_AGREE.get(model)
    if item_agree is None:
        return a == b
    return all(item_agree(x, y) for x, y in zip(a, b, strict=True))


def quorum_of(planned: int) -> int:
    """A majority of a batch's planned runs (k; 2 for a spot-checked batch)."""
    return planned // 2 + 1


@dataclass
class Verdict:
    accepted: dict[int, Any] = field(default_factory=dict)  # index -> the accepted run (a Part)
    agreed: list[Any] = field(default_factory=list)
    disagreed: list[Any] = field(default_factory=list)
    more: dict[int, int] = field(default_factory=dict)  # index -> replicas to add
    failed: dict[int, str] = field(default_factory=dict)  # index -> why no quorum can be reached
    groups: dict[int, tuple[list[Any], list[Any]]] = field(default_factory=dict)  # index -> (agreed, disagreed)
    ran_on: dict[int, set[str]] = field(default_factory=dict)  # index -> nodes, for the batches short of a quorum


def judge(*, model: str, redundancy: int, runs: list[Any], store: Any) -> Verdict:
    """The verdict over a task's final runs (`Part`s with replica, worker, result_sha256...)."""
    by_index: dict[int, list[Any]] = {}
    for run in runs:
        by_index.setdefault(run.index, []).append(run)
    extra = get_settings().extra_replicas
    loaded: dict[str, list[Any]] = {}
    verdict = Verdict()
    for index, group in sorted(by_index.items()):
        group.sort(key=lambda r: r.replica)
        if len(group) == 1:  # a solo run (redundancy 1, not spot-checked): nothing to compare
            verdict.accepted[index] = group[0]
            continue
        planned = redundancy if redundancy > 1 else 2
        clusters = _cluster(model, group, loaded, store)
        best = max(clusters, key=lambda c: (len({r.worker for r in c}), -c[0].replica))
        nodes = len({r.worker for r in best})
        need = quorum_of(planned)
        if nodes >= need:
            verdict.accepted[index] = best[0]
            others = [r for r in group if r not in best]
            verdict.agreed.extend(best)
            verdict.disagreed.extend(others)
            verdict.groups[index] = (best, others)
            continue
        room = planned + extra - len(group)
        if need - nodes <= room:
            verdict.more[index] = need - nodes
            verdict.ran_on[index] = {r.worker for r in group}
        else:
            distinct = len({r.worker for r in group})
            verdict.failed[index] = (f"{distinct} nodes disagreed on subtask {index}: no {need} of them "
                                     f"returned the same output")
    return verdict


def _cluster(model: str, group: list[Any], loaded: dict[str, list[Any]], store: Any) -> list[list[Any]]:
    """Runs grouped by agreement with each group's first run. Equal hashes agree without a read
    (equal bytes are equal JSON); other pairs compare their parsed outputs."""
    clusters: list[list[Any]] = []
    for run in group:
        for cluster in clusters:
            head = cluster[0]
            if run.result_sha256 == head.result_sha256 or agree(model, _outputs(head, loaded, store),
                                                                 _outputs(run, loaded, store)):
                cluster.append(run)
                break
        else:
            clusters.append([run])
    return clusters


def _outputs(run: Any, loaded: dict[str, list[Any]], store: Any) -> list[Any]:
    key = run.result_key
    if key not in loaded:
        loaded[key] = json.loads(store.get_bytes(key))
    return loaded[key]


def without_tiebreaker(verdict: Verdict, *, queue: str | None, model: str) -> str | None:
    """Why a verdict's extra replicas cannot run (every live node of the queue already ran a replica
    of that batch), or None. Registry unreachable: None (they wait, as any subtask does)."""
    if not verdict.more or not queue:
        return None
    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import live_workers, serves

    try:
        live = {w["hostname"] for w in live_workers(get_redis()) if serves(w, queue, model)}
    except Exception:
        return None
    for index in sorted(verdict.more):
        ran = verdict.ran_on.get(index, set())
        if not live - ran:
            return (f"{len(ran)} nodes disagreed on subtask {index}, and no other live node on {queue} "
                    f"can run a replica to break the tie")
    return None


# -- what a verdict writes ---------------------------------------------------------------------------

_MARK = text("""
    UPDATE subtasks SET agreed = v.agreed
    FROM unnest(CAST(:ids AS uuid[]), CAST(:flags AS boolean[])) AS v(id, agreed)
    WHERE subtasks.id = v.id
""")

_ADD = text("""
    INSERT INTO subtasks (id, task_id, index, replica, platform_paid, status, inputs, items, attempts, created_at)
    SELECT gen_random_uuid(), s.task_id, s.index, m.top + g, true, 'Pending', s.inputs, s.items, 0, :now
    FROM unnest(CAST(:indices AS integer[]), CAST(:counts AS integer[])) AS v(index, n)
    JOIN subtasks s ON s.task_id = :task_id AND s.index = v.index AND s.replica = 0
    CROSS JOIN LATERAL (SELECT max(replica) AS top FROM subtasks x WHERE x.task_id = :task_id
                        AND x.index = v.index) m
    CROSS JOIN LATERAL generate_series(1, v.n) AS g
""")


def add_replicas(session: Session, *, task: Any, more: dict[int, int], now: Any) -> int:
    """Queue the extra runs of batches short of a quorum (the platform's cost); they wait in the
    task's backlog for the fair dispatcher like any subtask. Returns how many."""
    indices = sorted(more)
    added = session.execute(_ADD, {"task_id": task.id, "now": now, "indices": indices,
                                   "counts": [more[i] for i in indices]}).rowcount
    task.subtask_count += added
    task.backlog += added
    audit.enqueue(session, actor="system", action="subtask.replicas_added", subject=f"task:{task.id}",
                  task_id=task.id, data={"subtasks": {str(i): more[i] for i in indices}})
    return int(added)


def record(session: Session, *, task: Any, verdict: Verdict) -> None:
    """Write a verdict's marks, reputations, audit records and events, in the task's final transaction."""
    from marketplace.registry import reputation

    runs = verdict.agreed + verdict.disagreed
    if not runs:
        return
    session.execute(_MARK, {"ids": [str(r.id) for r in runs],
                            "flags": [True] * len(verdict.agreed) + [False] * len(verdict.disagreed)})
    counts: dict[str, list[int]] = {}
    for run in verdict.agreed:
        counts.setdefault(run.worker, [0, 0])[0] += 1
    for run in verdict.disagreed:
        counts.setdefault(run.worker, [0, 0])[1] += 1
        accepted = verdict.accepted[run.index]
        audit.enqueue(session, actor="system", action="subtask.replica_disagreed", subject=f"subtask:{run.id}",
                      task_id=task.id, data={"index": run.index, "replica": run.replica, "node": run.worker,
                                             "sha256": run.result_sha256, "accepted_sha256": accepted.result_sha256,
                                             "accepted_replica": accepted.replica})
    reputation.add(session, counts=counts)
    events = []
    for index, (agreeing, others) in sorted(verdict.groups.items()):
        accepted = verdict.accepted[index]
        events.append((str(task.id), {
            "task_id": str(task.id), "user_id": str(task.user_id), "index": index,
            "accepted_subtask_id": str(accepted.id), "accepted_replica": accepted.replica,
            "accepted_node": accepted.worker, "result_sha256": accepted.result_sha256,
            "replicas": len(agreeing) + len(others),
            "agreed_nodes": [r.worker for r in agreeing], "disagreed_nodes": [r.worker for r in others],
        }))
    emit_many(session, type="SubTaskVerified", events=events)
