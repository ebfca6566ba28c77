"""Node reputation: each node's record of replicas judged against their quorum (`results.quorum`).

A node's score is the Wilson lower bound (95%) of the share of its judged replicas that agreed:
it rises with evidence, so a new node with two agreements scores below one with two hundred,
and one wrong answer weighs heavily on a short record. A node that has disagreed and scores
under `MARKETPLACE_REPUTATION_THRESHOLD` is demoted: it gets no solo work (the first run of a
redundancy-1 task's batch, `lifecycle.statements.ELIGIBLE`), but still replicas and spot checks,
so it can earn its standing back; it is restored once its score is over the threshold again.
Both moves are audited (`node.demoted`, `node.restored`).
"""
from __future__ import annotations

import math
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.orm import Session

from marketplace.audit import service as audit
from marketplace.infra.db import utcnow
from marketplace.settings import get_settings

Z = 1.96  # 95%


def wilson_lower_bound(agreed: int, total: int, z: float = Z) -> float:
    """The lower bound of the Wilson score interval of agreed/total; 0 with no record."""
    if total <= 0:
        return 0.0
    p = agreed / total
    denominator = 1 + z * z / total
    centre = p + z * z / (2 * total)
    margin = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return max(0.0, (centre - margin) / denominator)


def demoted(agreed: int, disagreed: int) -> bool:
    """Whether a node with this record gets no solo work."""
    return disagreed > 0 and wilson_lower_bound(agreed, agreed + disagreed) < get_settings().reputation_threshold


def document(agreed: int, disagreed: int, is_demoted: bool) -> dict[str, Any]:
    """A node's `reputation` as `GET /v1/workers` and gRPC `ListWorkers` show it."""
    return {"agreed": agreed, "disagreed": disagreed,
            "score": round(wilson_lower_bound(agreed, agreed + disagreed), 4), "demoted": is_demoted}


_ADD = text("""
    INSERT INTO node_reputation (worker, agreed, disagreed, demoted, updated_at)
    SELECT w, a, d, false, :now
    FROM unnest(CAST(:workers AS text[]), CAST(:agreed AS integer[]), CAST(:disagreed AS integer[])) AS v(w, a, d)
    ORDER BY w
    ON CONFLICT (worker) DO UPDATE SET agreed = node_reputation.agreed + EXCLUDED.agreed,
        disagreed = node_reputation.disagreed + EXCLUDED.disagreed, updated_at = EXCLUDED.updated_at
    RETURNING worker, agreed, disagreed, demoted
""")
_SET_DEMOTED = text("UPDATE node_reputation SET demoted = :demoted WHERE worker = :worker")


def add(session: Session, *, counts: dict[str, list[int]]) -> None:
    """Add judged replicas ({node: [agreed, disagreed]}) to their nodes' records, in the caller's
    transaction (a task's final one), and demote or restore the nodes whose standing crossed the
    threshold. Rows in name order: two tasks judged at once never wait on each other in a circle."""
    workers = sorted(w for w in counts if w)
    if not workers:
        return
    rows = session.execute(_ADD, {"now": utcnow(), "workers": workers, "agreed": [counts[w][0] for w in workers],
                                  "disagreed": [counts[w][1] for w in workers]}).all()
    threshold = get_settings().reputation_threshold
    for row in rows:
        should = demoted(row.agreed, row.disagreed)
        if should == row.demoted:
            continue
        session.execute(_SET_DEMOTED, {"demoted": should, "worker": row.worker})
        score = round(wilson_lower_bound(row.agreed, row.agreed + row.disagreed), 4)
        audit.enqueue(session, actor="system", action="node.demoted" if should else "node.restored",
                      subject=f"node:{row.worker}", data={"agreed": row.agreed, "disagreed": row.disagreed,
                                                          "score": score, "threshold": threshold})


def of(session: Session, hostnames: list[str]) -> dict[str, dict[str, Any]]:
    """{hostname: reputation document} of the nodes among `hostnames` that have a record."""
    if not hostnames:
        return {}
    rows = session.execute(text("SELECT worker, agreed, disagreed, demoted FROM node_reputation "
                                "WHERE worker IN :names").bindparams(bindparam("names", expanding=True)),
                           {"names": hostnames})
    return {w: document(a, d, dem) for w, a, d, dem in rows}


def new_node() -> dict[str, Any]:
    return document(0, 0, False)
