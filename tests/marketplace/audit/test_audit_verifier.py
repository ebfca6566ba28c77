"""The outside verifier (public key only) over a chain built in memory: each kind of tampering
is named at its first bad seq; receipts hold, and fail once any byte of them changes."""
from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from marketplace.audit import merkle
from marketplace.audit.hashing import canonical_json
from marketplace.audit.verifier import BadCheckpoint, receipt_bytes, receipt_problem, verify_records
from tests.support.audit_chain import checkpoint, make_chain, resign_from

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PUB = KEY.public_key()
N = 40


@pytest.fixture(scope="module")
def chain():  # type: ignore[no-untyped-def]
    records = make_chain(KEY, N)
    return records, [checkpoint(KEY, records, size) for size in (10, 20, 30, 40)]


def test_an_untouched_chain_verifies_against_every_checkpoint(chain):  # type: ignore[no-untyped-def]
    records, cps = chain
    v = verify_records(records, PUB, cps)
    assert v.valid and v.length == N and v.head == records[-1]["hash"] and v.checkpoints_matched == 4, v
    assert v.root == cps[-1]["root"]


def test_another_key_fails_at_the_first_record(chain):  # type: ignore[no-untyped-def]
    records, _ = chain
    v = verify_records(records, Ed25519PrivateKey.generate().public_key())
    assert not v.valid and v.first_bad_seq == 1 and "signature" in v.reason


def test_a_tampered_record_is_named(chain):  # type: ignore[no-untyped-def]
    records, cps = chain
    forged = [dict(r) for r in records]
    forged[16]["data_json"] = canonical_json({"n": 17, "cost": "0.00"})
    v = verify_records(forged, PUB, cps)
    assert not v.valid and v.first_bad_seq == 17 and "hash mismatch" in v.reason and v.length == 16, v


@pytest.mark.parametrize("every_signature", [False, True])
def test_a_rehashed_record_not_re_signed_is_named_by_its_signature(chain, every_signature):  # type: ignore[no-untyped-def]
    from marketplace.audit.hashing import record_hash

    records, cps = chain
    forged = [dict(r) for r in records]
    r = forged[16]
    r["actor"] = "user:evil"
    r["hash"] = record_hash(prev_hash=r["prev_hash"], seq=17, ts=r["ts"], actor=r["actor"], action=r["action"],
                            subject=r["subject"], task_id=r["task_id"], data=r["data_json"])
    # The next records' links follow the new hash (a chain re-hashed from 17 on, nothing re-signed).
    for prev, nxt in zip(forged[16:], forged[17:], strict=False):
        nxt["prev_hash"] = prev["hash"]
        nxt["hash"] = record_hash(prev_hash=nxt["prev_hash"], seq=nxt["seq"], ts=nxt["ts"], actor=nxt["actor"],
                                  action=nxt["action"], subject=nxt["subject"], task_id=nxt["task_id"],
                                  data=nxt["data_json"])
    for checkpoints in ([], cps):
        v = verify_records(forged, PUB, checkpoints, every_signature=every_signature)
        assert not v.valid and v.first_bad_seq == 17 and "signature" in v.reason and v.length == 16, v


def test_one_record_rewritten_and_re_signed_is_named_by_the_next_ones_signed_link(chain):  # type: ignore[no-untyped-def]
    records, _ = chain
    rewritten = resign_from(KEY, records, 17, actor="user:evil")[16:17]  # record 17 alone, re-signed
    forged = records[:16] + rewritten + records[17:]
    v = verify_records(forged, PUB)
    assert not v.valid and v.first_bad_seq == 17 and "rewritten" in v.reason, v


def test_a_deleted_record_is_named(chain):  # type: ignore[no-untyped-def]
    records, cps = chain
    v = verify_records(records[:16] + records[17:], PUB, cps)
    assert not v.valid and v.first_bad_seq == 17 and "deleted" in v.reason, v


def test_a_deleted_tail_is_caught_only_by_a_checkpoint(chain):  # type: ignore[no-untyped-def]
    records, cps = chain
    assert verify_records(records[:33], PUB).valid  # the shorter chain is intact in itself
    v = verify_records(records[:33], PUB, cps)
    assert not v.valid and v.first_bad_seq == 34 and "truncated" in v.reason and v.bad_range == [34, 40], v
    assert v.checkpoints_matched == 3


def test_a_middle_rewritten_and_re_signed_by_the_key_holder_is_caught_by_the_checkpoints(chain):  # type: ignore[no-untyped-def]
    records, cps = chain
    forged = resign_from(KEY, records, 21, data_json=canonical_json({"n": 21, "cost": "0.00"}))
    assert verify_records(forged, PUB).valid  # every hash, link and signature holds: only checkpoints tell
    v = verify_records(forged, PUB, cps)
    # Checkpoint 20 still matches, 30 does not: record 21 is the first not proven.
    assert not v.valid and v.first_bad_seq == 21 and v.bad_range == [21, 30] and "rewritten" in v.reason, v
    forged = resign_from(KEY, records, 25, actor="user:evil")
    v = verify_records(forged, PUB, cps)
    assert not v.valid and v.first_bad_seq == 21 and v.bad_range == [21, 30], v  # within 21..30: a root names no leaf
    assert "21..30" in v.reason


def test_a_fork_is_named(chain):  # type: ignore[no-untyped-def]
    records, cps = chain
    other = resign_from(KEY, records, 15, actor="user:evil")
    v = verify_records(records, PUB, [*cps, checkpoint(KEY, other, 20)])
    assert not v.valid and v.first_bad_seq == 11 and "fork" in v.reason and "matches one" in v.reason, v


def test_a_checkpoint_not_signed_with_the_key_is_refused(chain):  # type: ignore[no-untyped-def]
    records, cps = chain
    with pytest.raises(BadCheckpoint, match="size 21: bad signature"):
        verify_records(records, PUB, [{**cps[1], "size": 21}])
    with pytest.raises(BadCheckpoint, match="signature"):
        verify_records(records, PUB, [checkpoint(Ed25519PrivateKey.generate(), records, 10)])


def _receipt(records, cp, seq):  # type: ignore[no-untyped-def]
    hashes = [merkle.leaf_hash(bytes.fromhex(r["hash"])) for r in records[:cp["size"]]]
    record = records[seq - 1]
    return receipt_bytes({
        "version": 1, "task_id": record["task_id"], "record": record, "checkpoint": cp,
        "proof": {"leaf_index": seq - 1, "tree_size": cp["size"],
                  "hashes": [h.hex() for h in merkle.inclusion_proof(hashes, seq - 1)]},
    })


def test_a_receipt_verifies_and_fails_after_any_byte_changes(chain):  # type: ignore[no-untyped-def]
    records, cps = chain
    raw = _receipt(records, cps[2], 27)  # record 27 is a task.done; checkpoint of 30
    assert receipt_problem(raw, PUB) is None
    assert "signature" in receipt_problem(raw, Ed25519PrivateKey.generate().public_key())
    for i in range(len(raw)):
        for flip in (0x01, 0x20):
            changed = raw[:i] + bytes([raw[i] ^ flip]) + raw[i + 1:]
            assert receipt_problem(changed, PUB) is not None, (i, changed[max(0, i - 20):i + 20])
    assert receipt_problem(raw + b"\n", PUB) is not None and receipt_problem(raw[:-1], PUB) is not None


def test_a_receipt_is_no_proof_of_a_record_that_is_not_a_completion_or_not_in_the_tree(chain):  # type: ignore[no-untyped-def]
    records, cps = chain
    assert "completion" in receipt_problem(_receipt(records, cps[2], 26), PUB)
    doc = json.loads(_receipt(records, cps[2], 27))
    doc["proof"]["hashes"][0] = "00" * 32
    assert "inclusion proof" in receipt_problem(receipt_bytes(doc), PUB)
    other = resign_from(KEY, records, 27, data_json=canonical_json({"n": 27, "cost": "0.00"}))
    doc = json.loads(_receipt(other, cps[2], 27))  # a re-signed record against the checkpoint signed before
    doc["checkpoint"] = cps[2]
    assert "inclusion proof" in receipt_problem(receipt_bytes(doc), PUB)
