"""Verifying the audit chain from outside, by the public-key path: records per second.

Builds a chain of N records (default 1,000,000) signed with a key of its own, exactly as the
platform chains them (`marketplace.audit.hashing`), serialized as the API's pages
(GET /v1/audit/records, 1,000 records a page, JSON), with a signed checkpoint every 10,000.
Then, in the same run, times:

- hashing alone (the limit): each record's canonical JSON and sha256, nothing else;
- the verifier (`marketplace audit verify --url`'s path without the network): pages decoded,
  every field, hash and link checked, the RFC 9162 Merkle tree and every checkpoint; record
  signatures where no checkpoint vouches for the record (the default), then again checking every
  record's Ed25519 signature (`--every-signature`).

Building the chain signs N records: about as long as verifying it. `--cache FILE` keeps the
pages between runs.

    python bench/audit_verify.py                 # 1,000,000 records
    python bench/audit_verify.py --records 100000
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from marketplace.audit import merkle  # noqa: E402
from marketplace.audit.hashing import (  # noqa: E402
    GENESIS,
    LOG_ID,
    canonical_json,
    checkpoint_message,
    record_hash,
)
from marketplace.audit.verifier import ChainVerifier  # noqa: E402

PAGE = 1000
EVERY = 10_000


def build(n: int, key: Ed25519PrivateKey) -> tuple[list[bytes], list[dict]]:  # type: ignore[type-arg]
    pages, page, checkpoints = [], [], []
    prev, frontier = GENESIS, merkle.Frontier()
    for seq in range(1, n + 1):
        task = f"7d1c2a4e-0000-4000-8000-{seq // 8:012d}"
        fields = {"ts": f"2026-12-05T{(seq // 3_600_000) % 24:02d}:{(seq // 60_000) % 60:02d}:"
                        f"{(seq // 1000) % 60:02d}.{seq % 1000:03d}000Z",
                  "actor": "node:cpu-1", "action": "subtask.finished", "subject": f"subtask:{task}:{seq % 8}",
                  "task_id": task,
                  "data_json": canonical_json({"items": 16, "seconds": 0.0123, "sha256": "ab" * 32, "index": seq % 8})}
        digest = record_hash(prev_hash=prev, seq=seq, ts=fields["ts"], actor=fields["actor"], action=fields["action"],
                             subject=fields["subject"], task_id=fields["task_id"], data=fields["data_json"])
        page.append({"seq": seq, **fields, "prev_hash": prev, "hash": digest,
                     "signature": key.sign(bytes.fromhex(digest)).hex()})
        prev = digest
        frontier.append(bytes.fromhex(digest))
        if seq % EVERY == 0 or seq == n:
            cp = {"log": LOG_ID, "size": seq, "head": digest, "root": frontier.root().hex(),
                  "time": "2026-12-05T23:59:59.000000Z"}
            cp["signature"] = key.sign(checkpoint_message(cp)).hex()
            checkpoints.append(cp)
        if len(page) == PAGE or seq == n:
            pages.append(json.dumps({"records": page, "next_after_seq": seq if seq < n else None}).encode())
            page = []
    return pages, checkpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--every-signature-records", type=int, default=100_000,
                        help="how many records the every-signature pass checks (its rate is per record; "
                             "0: the whole chain)")
    parser.add_argument("--cache", type=Path, help="keep the built chain in this file (gzip) between runs")
    args = parser.parse_args()
    key = Ed25519PrivateKey.from_private_bytes(b"\x07" * 32)

    t0 = time.perf_counter()
    if args.cache and args.cache.exists():
        blob = json.loads(gzip.decompress(args.cache.read_bytes()))
        pages, checkpoints = [p.encode() for p in blob["pages"]], blob["checkpoints"]
        assert sum(len(json.loads(p)["records"]) for p in pages[:1]) and blob["records"] == args.records
    else:
        pages, checkpoints = build(args.records, key)
        if args.cache:
            args.cache.write_bytes(gzip.compress(json.dumps({
                "records": args.records, "pages": [p.decode() for p in pages], "checkpoints": checkpoints}).encode(), 1))
    print(f"chain of {args.records:,} records in {len(pages):,} pages, {len(checkpoints)} checkpoints "
          f"(built or loaded in {time.perf_counter() - t0:.1f} s)", flush=True)

    # The limit: hashing alone, from the decoded pages (decoding not counted).
    records = [r for p in pages for r in json.loads(p)["records"]]
    t0 = time.perf_counter()
    for r in records:
        record_hash(prev_hash=r["prev_hash"], seq=r["seq"], ts=r["ts"], actor=r["actor"], action=r["action"],
                    subject=r["subject"], task_id=r["task_id"], data=r["data_json"])
    hashing = time.perf_counter() - t0
    del records

    n = args.records
    print(f"cpu: {os.cpu_count()} cores, {os.uname().machine}; python {sys.version.split()[0]}")
    print(f"hashing alone (the limit):            {n / hashing:>10,.0f} records/s  ({hashing:.1f} s)", flush=True)
    for every_signature in (False, True):
        # The public-key path: pages decoded, every field, hash and link, the Merkle tree, every
        # checkpoint; record signatures where no checkpoint vouches for them, or (True) all of them.
        m = min(n, args.every_signature_records or n) if every_signature else n
        use = [p for p in pages[:math.ceil(m / PAGE)]]
        t0 = time.perf_counter()
        verifier = ChainVerifier(key.public_key(), [c for c in checkpoints if c["size"] <= m],
                                 every_signature=every_signature)
        for p in use:
            for r in json.loads(p)["records"]:
                verifier.feed(r)
        verdict = verifier.finish()
        took = time.perf_counter() - t0
        assert verdict.valid and verdict.length == m, verdict
        label = "verify, every record signature" if every_signature else "verify against the checkpoints"
        print(f"{label + ':':<38}{m / took:>10,.0f} records/s  ({took:.1f} s for {m:,}; "
              f"{m / took / (n / hashing):.0%} of the limit; {verdict.checkpoints_matched} checkpoints matched)",
              flush=True)
    print("(verify against the checkpoints: one Ed25519 verification per checkpoint covers its records; "
          "with every signature, one per record, which dominates)")


if __name__ == "__main__":
    main()
