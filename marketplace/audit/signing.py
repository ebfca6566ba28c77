"""The audit log's Ed25519 key: from `MARKETPLACE_AUDIT_SIGNING_KEY`, or a dev key derived from the JWT secret."""
from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from functools import lru_cache

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from marketplace.settings import get_settings

logger = logging.getLogger(__name__)


def _seed() -> bytes:
    settings = get_settings()
    if settings.audit_signing_key is not None and settings.audit_signing_key.get_secret_value():
        raw = settings.audit_signing_key.get_secret_value().strip()
        try:
            seed = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("MARKETPLACE_AUDIT_SIGNING_KEY must be base64 of a 32-byte Ed25519 seed") from exc
        if len(seed) != 32:
            raise ValueError(f"MARKETPLACE_AUDIT_SIGNING_KEY decodes to {len(seed)} bytes, expected 32")
        return seed
    # Deterministic, so every process of a dev stack signs with the same key.
    return hashlib.sha256(b"marketplace-audit-dev-key:" + settings.jwt_secret.get_secret_value().encode()).digest()


@lru_cache(maxsize=4)
def _private_key(seed: bytes) -> Ed25519PrivateKey:
    if get_settings().audit_signing_key is None:
        logger.warning("audit: MARKETPLACE_AUDIT_SIGNING_KEY is not set; using a dev key derived from the JWT secret")
    return Ed25519PrivateKey.from_private_bytes(seed)


def private_key() -> Ed25519PrivateKey:
    return _private_key(_seed())


def public_key() -> Ed25519PublicKey:
    return private_key().public_key()


def public_key_pem() -> str:
    return public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def sign(digest_hex: str) -> str:
    """Hex Ed25519 signature over the record hash (its 32 raw bytes)."""
    return private_key().sign(bytes.fromhex(digest_hex)).hex()


def verify(digest_hex: str, signature_hex: str, key: Ed25519PublicKey | None = None) -> bool:
    try:
        (key or public_key()).verify(bytes.fromhex(signature_hex), bytes.fromhex(digest_hex))
        return True
    except (InvalidSignature, ValueError):
        return False
