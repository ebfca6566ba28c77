"""A node's secrets and signatures: made at enrollment, checked by the platform on every part.

The node secret authenticates a node's gRPC calls; the platform keeps only its sha256 (a
256-bit random value needs no slow hash). The Ed25519 key signs each part: the platform keeps
the public key, and a part's signature covers (subtask id, attempt, sha256 of the output).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PART_CONTEXT = b"marketplace-part-v1"


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(secret_hash(secret), stored_hash)


def new_keypair() -> tuple[str, str]:
    """(private seed, public key), each base64 of 32 raw bytes."""
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(seed).decode(), base64.b64encode(public).decode()


def part_message(subtask_id: str, attempt: int, sha256: str) -> bytes:
    """What a part's signature covers."""
    return b"\n".join([PART_CONTEXT, subtask_id.encode(), str(int(attempt)).encode(), sha256.encode()])


def sign_part(private_seed_b64: str, *, subtask_id: str, attempt: int, sha256: str) -> str:
    key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(private_seed_b64))
    return base64.b64encode(key.sign(part_message(subtask_id, attempt, sha256))).decode()


def verify_part(public_key_b64: str, signature_b64: str, *, subtask_id: str, attempt: int, sha256: str) -> bool:
    """Whether `signature_b64` is the enrolled key's over this part; False for any malformed input."""
    if not signature_b64:
        return False
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64))
        public.verify(base64.b64decode(signature_b64, validate=True), part_message(subtask_id, attempt, sha256))
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


def sealed_fields(work: dict[str, Any]) -> str:
    """A claimed run's facts as the platform seals them in its ticket (`providers.work.ticket`), and
    as the node sends them back: no inputs (they may be big; the outcome needs none)."""
    return json.dumps({k: v for k, v in work.items() if k not in ("inputs", "params", "waited")}, sort_keys=True)
