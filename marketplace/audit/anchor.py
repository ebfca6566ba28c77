"""The chain's head, kept outside PostgreSQL too: truncation at the end becomes detectable.

Deleting the last records of a hash chain leaves a valid, shorter chain. After every
commit that extends the chain, its new head (seq, hash) is written to Redis under the
chain's root (the hash of record 1, so two databases sharing a Redis never mix), and
only ever forward (a late writer with an older head does not move it back).
`verify_chain` then requires that record to exist, unchanged. Someone able to edit
both PostgreSQL and Redis can still hide a truncation; the AuditEvent stream on Kafka
is the third copy. A flushed Redis only loses the check until the next record.
"""
from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

logger = logging.getLogger(__name__)
KEY_PREFIX = "marketplace:audit:anchor:"
_INFO_KEY = "marketplace.audit.anchor"
# Move the anchor forward only: HSET when the stored seq is lower (or absent).
_FORWARD = """
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
if tonumber(ARGV[1]) > seq then
    redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'hash', ARGV[2])
    return 1
end
return 0
"""


def _key(root: str) -> str:
    return KEY_PREFIX + root[:32]


def remember(session: Session, *, root: str, seq: int, head: str) -> None:
    """Write (seq, head) for the chain `root` once this transaction commits."""
    session.info[_INFO_KEY] = (root, seq, head)


def write(*, root: str, seq: int, head: str) -> None:
    from marketplace.infra.redis_client import get_redis

    get_redis().eval(_FORWARD, 1, _key(root), seq, head)


def read(root: str) -> tuple[int, str] | None:
    """The anchored (seq, hash) of the chain starting with `root`; None when none is kept."""
    from marketplace.infra.redis_client import get_redis

    raw = get_redis().hmget(_key(root), ["seq", "hash"])
    if not raw or raw[0] is None:
        return None
    seq, head = (v.decode() if isinstance(v, bytes) else v for v in raw)
    return int(seq), str(head)


@event.listens_for(Session, "after_commit")
def _write_after_commit(session: Session) -> None:
    pending: Any = session.info.pop(_INFO_KEY, None)
    if pending is None:
        return
    root, seq, head = pending
    try:
        write(root=root, seq=seq, head=head)
    except Exception as exc:  # the record is committed; the next one moves the anchor again
        logger.warning("audit: could not write the chain anchor (seq %s): %s", seq, exc)


@event.listens_for(Session, "after_rollback")
def _forget(session: Session) -> None:
    session.info.pop(_INFO_KEY, None)
