"""RFC 9162 (Certificate Transparency v2) Merkle trees over the audit records, pure functions.

The leaves are the records' hashes (their 32 raw bytes); `leaf_hash` and `node_hash` are the
RFC's, with its 0x00 / 0x01 prefixes, and a tree of n leaves splits at the largest power of two
below n (RFC 9162 §2.1.1), so any RFC 9162 implementation computes the same roots and checks
the same proofs. Nothing here reads settings or touches a database: a verifier imports it alone.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()
NODE_STEP = 8  # subtree roots worth keeping: every 2**8, 2**16, ... leaves (see Frontier.on_node)


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_of_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """MTH(D[n]) from the leaves' hashes."""
    frontier = Frontier()
    for h in hashes:
        frontier.append_hash(h)
    return frontier.root()


def root(leaves: Iterable[bytes]) -> bytes:
    """MTH(D[n]) of the leaves' data."""
    return root_of_leaf_hashes([leaf_hash(d) for d in leaves])


def inclusion_proof(hashes: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(index, D[n]) (RFC 9162 §2.1.3.1), from the leaves' hashes; siblings from the leaf up."""
    n = len(hashes)
    if not 0 <= index < n:
        raise ValueError(f"leaf {index} is not in a tree of {n}")
    path: list[bytes] = []
    lo, hi = 0, n
    while hi - lo > 1:  # top down, then reversed: the RFC's recursion without the recursion
        k = _split(hi - lo)
        if index < lo + k:
            path.append(root_of_leaf_hashes(hashes[lo + k:hi]))
            hi = lo + k
        else:
            path.append(root_of_leaf_hashes(hashes[lo:lo + k]))
            lo = lo + k
    path.reverse()
    return path


def inclusion_proof_by_ranges(index: int, size: int, mth: Callable[[int, int], bytes]) -> list[bytes]:
    """PATH(index, D[size]) with the subtrees' roots from `mth(lo, hi)` (the root of leaves lo..hi-1):
    a log that keeps some subtrees' roots answers without reading every leaf."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of {size}")
    path: list[bytes] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            path.append(mth(lo + k, hi))
            hi = lo + k
        else:
            path.append(mth(lo, lo + k))
            lo = lo + k
    path.reverse()
    return path


def root_from_inclusion(leaf: bytes, index: int, size: int, path: Sequence[bytes]) -> bytes | None:
    """The root that `path` proves `leaf` (its hash) to be leaf `index` of a tree of `size` under,
    or None when the path cannot be one (RFC 9162 §2.1.3.2)."""
    if not 0 <= index < size:
        return None
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


def verify_inclusion(leaf: bytes, index: int, size: int, path: Sequence[bytes], expected_root: bytes) -> bool:
    return root_from_inclusion(leaf, index, size, path) == expected_root


class Frontier:
    """The roots of the perfect subtrees a tree of `size` leaves is made of (largest first):
    appending a leaf and the root of the tree so far, in O(log n), without keeping the leaves.
    Checkpoints store it, so the next one reads only the records after theirs."""

    # Called with (level, index, root) for each perfect subtree of 2**level leaves (level a positive
    # multiple of NODE_STEP) completed by an append: leaves index * 2**level .. (index + 1) * 2**level - 1.
    on_node: Callable[[int, int, bytes], None] | None = None

    def __init__(self, size: int = 0, peaks: Sequence[bytes] = ()) -> None:
        if len(peaks) != bin(size).count("1"):
            raise ValueError(f"a tree of {size} leaves has {bin(size).count('1')} peaks, not {len(peaks)}")
        self.size = size
        # (leaves under it, its root), largest first: the binary digits of `size`
        self._peaks = [(1 << b, h) for b, h in zip(
            [b for b in range(size.bit_length() - 1, -1, -1) if size >> b & 1], peaks, strict=True)]

    def append_hash(self, h: bytes) -> None:
        peaks = self._peaks
        peaks.append((1, h))
        while len(peaks) > 1 and peaks[-1][0] == peaks[-2][0]:
            (n, right), (_, left) = peaks.pop(), peaks.pop()
            peaks.append((2 * n, node_hash(left, right)))
            level = (2 * n).bit_length() - 1
            if self.on_node is not None and level % NODE_STEP == 0:
                self.on_node(level, (self.size + 1 - 2 * n) >> level, peaks[-1][1])
        self.size += 1

    def append(self, data: bytes) -> None:
        self.append_hash(leaf_hash(data))

    def root(self) -> bytes:
        if not self._peaks:
            return EMPTY_ROOT
        acc = self._peaks[-1][1]
        for _, h in reversed(self._peaks[:-1]):
            acc = node_hash(h, acc)
        return acc

    def peaks(self) -> list[bytes]:
        return [h for _, h in self._peaks]
