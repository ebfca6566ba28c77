"""Checking the audit log from outside: the chain against signed checkpoints, and receipts.

Pure: the records, the checkpoints and the public key come from the caller (the API's pages, a
database read, files); nothing here asks the platform whether anything is valid, and nothing
reads settings or secrets. `ChainVerifier` takes the records in seq order, one at a time, and
names the first bad seq:

- an edited record: its own seq (its hash, or its signature, no longer checks; a signature is
  checked when a checkpoint cannot vouch for it, see `ChainVerifier`);
- a record rewritten and re-signed, the ones after it untouched: its seq (the next record's
  signed prev_hash names the record that was there);
- a deleted record: its seq (the gap);
- a chain re-signed from some record on (whoever holds the key can make a valid chain): the
  checkpoints signed earlier no longer match. Every record up to the last checkpoint that still
  matches (size P) is proven; the first bad seq named is P + 1, and `bad_range` says the change
  lies in P + 1 .. S, S the size of the first checkpoint that does not match. A root names no
  single leaf: publishing checkpoints more often narrows the range;
- a deleted tail: a checkpoint larger than the chain; the first missing seq;
- a fork: two checkpoints of the same size with different trees (the log showed two histories).
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from marketplace.audit import merkle
from marketplace.audit.hashing import (
    BAD_SIGNATURE,
    CHECKPOINT_FIELDS,
    GENESIS,
    RECORD_FIELDS,
    canonical_json,
    checkpoint_problem,
    record_problem,
    signature_ok,
)

RECEIPT_VERSION = 1
RECEIPT_FIELDS = ("version", "task_id", "record", "proof", "checkpoint")
PROOF_FIELDS = ("leaf_index", "tree_size", "hashes")
COMPLETIONS = ("task.done", "task.failed", "task.cancelled")


class BadCheckpoint(ValueError):
    """A checkpoint given to the verifier is malformed or not signed with the key."""


@dataclass
class Verdict:
    valid: bool
    length: int  # records verified (in order, from seq 1)
    head: str
    root: str  # Merkle root over the verified records
    first_bad_seq: int | None = None
    reason: str | None = None
    bad_range: list[int] | None = None
    checkpoints_matched: int = 0
    checkpoints: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ChainVerifier:
    """Feed the records in seq order; `finish()` gives the verdict.

    A signed checkpoint authenticates every record up to its size at once: its head is the hash
    of record `size`, which commits through the chain to every record before it. So while a
    checkpoint lies ahead, record signatures wait (their seq, hash and signature only, at most
    `MAX_WAITING`) and are settled by that checkpoint's signature; each is checked only if the
    checkpoint does not match (to name a record edited and re-hashed but not re-signed exactly)
    or something else fails first. Records after the last checkpoint, and every record with
    `every_signature`, are checked one by one.
    """

    key: Ed25519PublicKey
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    every_signature: bool = False
    MAX_WAITING = 100_000

    def __post_init__(self) -> None:
        for cp in self.checkpoints:
            problem = checkpoint_problem(cp, self.key)
            if problem:
                size = cp.get("size") if isinstance(cp, dict) else None
                raise BadCheckpoint(f"checkpoint of size {size}: {problem}")
        self._by_size: dict[int, list[dict[str, Any]]] = {}
        for cp in self.checkpoints:
            same = self._by_size.setdefault(cp["size"], [])
            if all((c["head"], c["root"]) != (cp["head"], cp["root"]) for c in same):
                same.append(cp)
        self._sizes = sorted(self._by_size)
        self._next = 0  # index into _sizes of the next checkpoint to meet
        self._waiting: list[tuple[int, str, str]] = []  # (seq, hash, signature) not checked yet
        self.frontier = merkle.Frontier()
        self.expected, self.prev, self.matched_size, self.matched = 1, GENESIS, 0, 0
        self.verdict: Verdict | None = None

    def resume(self, *, size: int, head: str, peaks: list[bytes]) -> None:
        """Start after record `size` (hash `head`, Merkle frontier `peaks`) instead of the genesis."""
        self.frontier = merkle.Frontier(size, peaks)
        self.expected, self.prev, self.matched_size = size + 1, head, size

    # -- feeding --------------------------------------------------------------------------------
    def _fail(self, seq: int, reason: str, bad_range: list[int] | None = None) -> bool:
        earlier = self._settle_waiting()
        # A record before it (or in the range a checkpoint failed for) was never signed: the first bad.
        if earlier is not None and (earlier < seq or (bad_range is not None and earlier <= bad_range[1])):
            seq, reason, bad_range = earlier, BAD_SIGNATURE, None
        self.verdict = Verdict(valid=False, length=min(seq, self.expected) - 1,
                               head=self.prev, root=self.frontier.root().hex(), first_bad_seq=seq, reason=reason,
                               bad_range=bad_range, checkpoints_matched=self.matched,
                               checkpoints=len(self.checkpoints))
        return False

    def _settle_waiting(self) -> int | None:
        """Check the waiting signatures; the first bad seq among them, if any."""
        waiting, self._waiting = self._waiting, []
        for seq, digest, signature in waiting:
            if not signature_ok(self.key, bytes.fromhex(digest), signature):
                return seq
        return None

    def feed(self, record: dict[str, Any]) -> bool:
        """Check the next record (public form); False once the chain is found bad (see `verdict`)."""
        if self.verdict is not None:
            return False
        seq = record.get("seq") if isinstance(record, dict) else None
        if type(seq) is int and seq != self.expected:
            if seq > self.expected:
                return self._fail(self.expected, f"record {self.expected} is missing (next is {seq}): deleted")
            return self._fail(seq, f"unexpected seq {seq} after {self.expected - 1}")
        deferred = not self.every_signature and self._next < len(self._sizes)
        problem = record_problem(record, self.key, signature=not deferred) if isinstance(record, dict) \
            else "not a JSON object"
        if problem:
            return self._fail(self.expected, problem)
        if record["prev_hash"] != self.prev:
            if deferred and not signature_ok(self.key, bytes.fromhex(record["hash"]), record["signature"]):
                return self._fail(seq, BAD_SIGNATURE)
            # This record is signed and its hash covers its prev_hash: that is the hash the
            # record before it had when this one was written. The one there now is another.
            return self._fail(seq - 1, f"record {seq - 1} is not the one record {seq} was chained to "
                                       f"(its signed prev_hash differs): record {seq - 1} was rewritten")
        if deferred:
            self._waiting.append((seq, record["hash"], record["signature"]))
            if len(self._waiting) >= self.MAX_WAITING:
                bad = self._settle_waiting()
                if bad is not None:
                    return self._fail(bad, BAD_SIGNATURE)
        self.frontier.append(bytes.fromhex(record["hash"]))
        self.prev = record["hash"]
        self.expected += 1
        if self._next < len(self._sizes) and self._sizes[self._next] == seq:
            self._next += 1
            return self._check_checkpoints(seq)
        return True

    def _check_checkpoints(self, size: int) -> bool:
        root = self.frontier.root().hex()
        signed = self._by_size[size]
        agreeing = [c for c in signed if c["head"] == self.prev and c["root"] == root]
        if len(agreeing) == len(signed):
            self._waiting.clear()  # every record up to here is what the checkpoint's signature covers
            self.matched_size = size
            self.matched += len(signed)
            return True
        first = self.matched_size + 1
        span = [first, size]
        if len(signed) > 1:
            return self._fail(first, f"fork: {len(signed)} checkpoints signed for size {size} disagree "
                                     f"({'the chain matches one of them' if agreeing else 'the chain matches none'}); "
                                     f"the log showed more than one history of records {first}..{size}", span)
        cp = signed[0]
        where = "its head record differs" if cp["head"] != self.prev else "its Merkle root differs"
        return self._fail(first, f"the chain differs from the checkpoint of size {size} signed at {cp['time']} "
                                 f"({where}): a record in {first}..{size} was rewritten and the chain re-signed "
                                 f"after it (records 1..{first - 1} match "
                                 f"{'a checkpoint' if first > 1 else 'nothing signed yet'})", span)

    def finish(self) -> Verdict:
        """The verdict once every record was fed."""
        if self.verdict is not None:
            return self.verdict
        length = self.expected - 1
        beyond = [s for s in self._sizes if s > length]
        if beyond:
            self._fail(length + 1, f"records {length + 1} to {max(beyond)} are missing from the end of the chain "
                                   f"(a checkpoint signed for size {max(beyond)} covers them): truncated",
                       [length + 1, max(beyond)])
            assert self.verdict is not None
            return self.verdict
        bad = self._settle_waiting()  # none wait here: a checkpoint lay ahead of each; kept for safety
        if bad is not None:
            self._fail(bad, BAD_SIGNATURE)
            assert self.verdict is not None
            return self.verdict
        return Verdict(valid=True, length=length, head=self.prev, root=self.frontier.root().hex(),
                       checkpoints_matched=self.matched, checkpoints=len(self.checkpoints))


def verify_records(records: Iterable[dict[str, Any]], key: Ed25519PublicKey,
                   checkpoints: list[dict[str, Any]] | None = None, *, every_signature: bool = False) -> Verdict:
    verifier = ChainVerifier(key, list(checkpoints or []), every_signature=every_signature)
    for record in records:
        if not verifier.feed(record):
            break
    return verifier.finish()


# -- receipts -----------------------------------------------------------------------------------

def receipt_bytes(receipt: dict[str, Any]) -> bytes:
    """A receipt as served and saved: canonical JSON and a newline (so its bytes are checkable)."""
    return (canonical_json(receipt) + "\n").encode()


def receipt_problem(raw: bytes, key: Ed25519PublicKey) -> str | None:
    """Why the receipt in `raw` (a file's bytes) does not prove its task's completion record is in
    the log the key signs (None when it does). Every byte counts: the file must be the canonical
    form of what it says, so no change to it, however small, keeps it valid."""
    try:
        receipt = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return f"not JSON: {exc}"
    if not isinstance(receipt, dict) or set(receipt) != set(RECEIPT_FIELDS):
        return f"a receipt has exactly the fields {', '.join(RECEIPT_FIELDS)}"
    if receipt_bytes(receipt) != raw:
        return "not in canonical form (compact, key-sorted JSON and one newline): the file was changed"
    if receipt["version"] != RECEIPT_VERSION or type(receipt["version"]) is not int:
        return f"version is not {RECEIPT_VERSION}"
    record, proof, cp = receipt["record"], receipt["proof"], receipt["checkpoint"]
    if not isinstance(record, dict) or set(record) != set(RECORD_FIELDS):
        return f"the record has exactly the fields {', '.join(RECORD_FIELDS)}"
    problem = record_problem(record, key)
    if problem:
        return f"record {record.get('seq')}: {problem}"
    if not isinstance(receipt["task_id"], str) or record["task_id"] != receipt["task_id"]:
        return "the record is not about the receipt's task"
    if record["action"] not in COMPLETIONS:
        return f"the record is a {record['action']!r}, not a task's completion ({', '.join(COMPLETIONS)})"
    if not isinstance(cp, dict) or set(cp) != set(CHECKPOINT_FIELDS):
        return f"the checkpoint has exactly the fields {', '.join(CHECKPOINT_FIELDS)}"
    problem = checkpoint_problem(cp, key)
    if problem:
        return f"checkpoint: {problem}"
    if not isinstance(proof, dict) or set(proof) != set(PROOF_FIELDS):
        return f"the proof has exactly the fields {', '.join(PROOF_FIELDS)}"
    if proof["leaf_index"] != record["seq"] - 1 or type(proof["leaf_index"]) is not int:
        return "the proof's leaf_index is not the record's seq - 1"
    if proof["tree_size"] != cp["size"] or type(proof["tree_size"]) is not int:
        return "the proof's tree_size is not the checkpoint's size"
    hashes = proof["hashes"]
    if not isinstance(hashes, list) or not all(isinstance(h, str) and len(h) == 64 and h == h.lower()
                                               for h in hashes):
        return "the proof's hashes are not 64 lowercase hex digits each"
    try:
        path = [bytes.fromhex(h) for h in hashes]
    except ValueError:
        return "the proof's hashes are not hex"
    leaf = merkle.leaf_hash(bytes.fromhex(record["hash"]))
    if not merkle.verify_inclusion(leaf, proof["leaf_index"], cp["size"], path, bytes.fromhex(cp["root"])):
        return f"the inclusion proof does not lead to the checkpoint's root: record {record['seq']} is not " \
               f"in the tree the log signed"
    if record["seq"] == cp["size"] and cp["head"] != record["hash"]:
        return "the checkpoint's head is not the record, which is its last"
    return None
