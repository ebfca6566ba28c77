"""How an audit record and a checkpoint are serialized, hashed and signed: pure functions.

A verifier needs these and the public key, nothing else: no settings, no secrets, no database.

- A record's hash: sha256(prev_hash ‖ canonical record), the canonical record being compact,
  key-sorted UTF-8 JSON of {seq, ts, actor, action, subject, task_id, data} where `ts` is
  `YYYY-MM-DDTHH:MM:SS.ffffffZ` and `data` the record's canonical JSON text itself (a string).
  Its signature: Ed25519 over the hash's 32 raw bytes.
- A record's public form (`public_record`): those fields, `data_json` for `data`, with
  `prev_hash`, `hash` and `signature`, all strings but `seq`: what the API pages, receipts carry
  and `verify_record` checks.
- A checkpoint (a signed tree head, as Certificate Transparency's): {log, size, head, root,
  time, signature}; `head` is the hash of record `size`, `root` the RFC 9162 Merkle root over
  the hashes of records 1..size (`merkle`). The signature is Ed25519 over `checkpoint_message`:
  a fixed prefix, then the canonical JSON of the other fields (a record's signature covers 32
  bytes, a checkpoint's more, so one can never pass for the other).
"""
from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

GENESIS = "0" * 64
LOG_ID = "marketplace-audit"
CHECKPOINT_PREFIX = b"marketplace-audit-checkpoint-v1\n"
RECORD_FIELDS = ("seq", "ts", "actor", "action", "subject", "task_id", "data_json", "prev_hash", "hash", "signature")
CHECKPOINT_FIELDS = ("log", "size", "head", "root", "time", "signature")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")
BAD_SIGNATURE = "bad signature: not signed with this public key"
_TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def canonical_ts(ts: datetime | str) -> str:
    if isinstance(ts, str):
        return ts
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record_hash(
    *, prev_hash: str, seq: int, ts: datetime | str, actor: str, action: str, subject: str, task_id: str | None,
    data: str,
) -> str:
    body = canonical_json({
        "seq": seq, "ts": canonical_ts(ts), "actor": actor, "action": action, "subject": subject,
        "task_id": task_id, "data": data,
    })
    return hashlib.sha256(prev_hash.encode("ascii") + body.encode("utf-8")).hexdigest()


def public_record(row: Any) -> dict[str, Any]:
    """A record (ORM row, Row or dict with `data`) in its public form."""
    get = row.get if isinstance(row, dict) else (lambda k: getattr(row, k))
    return {
        "seq": int(get("seq")), "ts": canonical_ts(get("ts")), "actor": get("actor"), "action": get("action"),
        "subject": get("subject"), "task_id": get("task_id"), "data_json": get("data"),
        "prev_hash": get("prev_hash"), "hash": get("hash"), "signature": get("signature"),
    }


def load_public_key(pem: bytes | str) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the audit log's key is Ed25519; this PEM holds another kind of key")
    return key


def public_key_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def signature_ok(key: Ed25519PublicKey, message: bytes, signature_hex: str) -> bool:
    try:
        key.verify(bytes.fromhex(signature_hex), message)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def record_problem(record: dict[str, Any], key: Ed25519PublicKey, *, signature: bool = True) -> str | None:
    """Why a record in public form is not one the key's holder wrote (None when it is): its
    fields, its hash over them and its `prev_hash`, its signature over the hash (unless not
    `signature`: the caller checks it later, or a signed checkpoint covers the record)."""
    if set(record) != set(RECORD_FIELDS):
        return f"the record's fields are not {', '.join(RECORD_FIELDS)}"
    if type(record["seq"]) is not int or record["seq"] < 1:
        return "seq is not a positive integer"
    for name in ("actor", "action", "subject", "data_json", "ts"):
        if not isinstance(record[name], str):
            return f"{name} is not a string"
    if record["task_id"] is not None and not isinstance(record["task_id"], str):
        return "task_id is neither a string nor null"
    if not _TS.fullmatch(record["ts"]):
        return "ts is not YYYY-MM-DDTHH:MM:SS.ffffffZ"
    for name in ("prev_hash", "hash"):
        if not isinstance(record[name], str) or not _HEX64.fullmatch(record[name]):
            return f"{name} is not 64 lowercase hex digits"
    if not isinstance(record["signature"], str) or not _HEX128.fullmatch(record["signature"]):
        return "signature is not 128 lowercase hex digits"
    digest = record_hash(prev_hash=record["prev_hash"], seq=record["seq"], ts=record["ts"], actor=record["actor"],
                         action=record["action"], subject=record["subject"], task_id=record["task_id"],
                         data=record["data_json"])
    if digest != record["hash"]:
        return "hash mismatch: the record was edited or moved"
    if signature and not signature_ok(key, bytes.fromhex(digest), record["signature"]):
        return BAD_SIGNATURE
    return None


def checkpoint_message(checkpoint: dict[str, Any]) -> bytes:
    """The bytes a checkpoint's signature covers."""
    return CHECKPOINT_PREFIX + canonical_json({k: checkpoint[k] for k in CHECKPOINT_FIELDS if k != "signature"}).encode()


def checkpoint_problem(checkpoint: Any, key: Ed25519PublicKey) -> str | None:
    """Why `checkpoint` is not a well-formed checkpoint signed with `key` (None when it is)."""
    if not isinstance(checkpoint, dict) or set(checkpoint) != set(CHECKPOINT_FIELDS):
        return f"a checkpoint has exactly the fields {', '.join(CHECKPOINT_FIELDS)}"
    if checkpoint["log"] != LOG_ID:
        return f"log is not {LOG_ID!r}"
    if type(checkpoint["size"]) is not int or checkpoint["size"] < 1:
        return "size is not a positive integer"
    for name in ("head", "root"):
        if not isinstance(checkpoint[name], str) or not _HEX64.fullmatch(checkpoint[name]):
            return f"{name} is not 64 lowercase hex digits"
    if not isinstance(checkpoint["time"], str) or not _TS.fullmatch(checkpoint["time"]):
        return "time is not YYYY-MM-DDTHH:MM:SS.ffffffZ"
    if not isinstance(checkpoint["signature"], str) or not _HEX128.fullmatch(checkpoint["signature"]):
        return "signature is not 128 lowercase hex digits"
    if not signature_ok(key, checkpoint_message(checkpoint), checkpoint["signature"]):
        return "bad signature: not signed with this public key"
    return None


def checkpoint_bytes(checkpoint: dict[str, Any]) -> bytes:
    """A checkpoint as published (object store, files): canonical JSON and a newline."""
    return (canonical_json({k: checkpoint[k] for k in CHECKPOINT_FIELDS}) + "\n").encode()
