"""An audit chain built in memory with a key of the test's own, as the platform builds it."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from marketplace.audit import merkle
from marketplace.audit.hashing import GENESIS, LOG_ID, canonical_json, canonical_ts, checkpoint_message, record_hash

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def sign_record(key: Ed25519PrivateKey, prev: str, seq: int, fields: dict[str, Any]) -> dict[str, Any]:
    digest = record_hash(prev_hash=prev, seq=seq, ts=fields["ts"], actor=fields["actor"], action=fields["action"],
                         subject=fields["subject"], task_id=fields["task_id"], data=fields["data_json"])
    return {"seq": seq, **fields, "prev_hash": prev, "hash": digest, "signature": key.sign(bytes.fromhex(digest)).hex()}


def make_chain(key: Ed25519PrivateKey, n: int) -> list[dict[str, Any]]:
    records, prev = [], GENESIS
    for seq in range(1, n + 1):
        task = f"00000000-0000-4000-8000-{seq:012d}"
        r = sign_record(key, prev, seq, {
            "ts": canonical_ts(T0 + timedelta(milliseconds=seq)), "actor": "system",
            "action": "task.done" if seq % 3 == 0 else "subtask.finished", "subject": f"task:{task}",
            "task_id": task, "data_json": canonical_json({"n": seq, "cost": "0.25", "note": "é"}),
        })
        records.append(r)
        prev = r["hash"]
    return records


def resign_from(key: Ed25519PrivateKey, records: list[dict[str, Any]], seq: int,
                **changes: Any) -> list[dict[str, Any]]:
    """Record `seq` changed, and it and every record after it re-hashed and re-signed with the key:
    what an operator holding the key can do."""
    out = [dict(r) for r in records[:seq - 1]]
    prev = out[-1]["hash"] if out else GENESIS
    for r in records[seq - 1:]:
        fields = {k: r[k] for k in ("ts", "actor", "action", "subject", "task_id", "data_json")}
        if r["seq"] == seq:
            fields.update(changes)
        new = sign_record(key, prev, r["seq"], fields)
        out.append(new)
        prev = new["hash"]
    return out


def checkpoint(key: Ed25519PrivateKey, records: list[dict[str, Any]], size: int,
               time: datetime | None = None) -> dict[str, Any]:
    cp = {"log": LOG_ID, "size": size, "head": records[size - 1]["hash"],
          "root": merkle.root([bytes.fromhex(r["hash"]) for r in records[:size]]).hex(),
          "time": canonical_ts(time or T0 + timedelta(seconds=size))}
    cp["signature"] = key.sign(checkpoint_message(cp)).hex()
    return cp
