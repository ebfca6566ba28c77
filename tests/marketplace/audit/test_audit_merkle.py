"""RFC 9162 Merkle trees: roots and inclusion proofs against hand-computed trees and the
Certificate Transparency reference vectors (RFC 6962's, which RFC 9162 keeps)."""
from __future__ import annotations

import hashlib

import pytest

from marketplace.audit import merkle


def H(b: bytes) -> bytes:  # noqa: N802
    return hashlib.sha256(b).digest()


def leaf(d: bytes) -> bytes:
    return H(b"\x00" + d)


def node(a: bytes, b: bytes) -> bytes:
    return H(b"\x01" + a + b)


def test_small_trees_hand_computed():
    a, b, c, d, e = (leaf(x) for x in (b"a", b"b", b"c", b"d", b"e"))
    assert merkle.root([]) == H(b"")
    assert merkle.root([b"a"]) == a
    assert merkle.root([b"a", b"b"]) == node(a, b)
    # Three leaves split 2 + 1 (the largest power of two below 3), not 1 + 2.
    assert merkle.root([b"a", b"b", b"c"]) == node(node(a, b), c)
    assert merkle.root([b"a", b"b", b"c", b"d"]) == node(node(a, b), node(c, d))
    assert merkle.root([b"a", b"b", b"c", b"d", b"e"]) == node(node(node(a, b), node(c, d)), e)


def test_inclusion_proofs_hand_computed():
    a, b, c, d, e = (leaf(x) for x in (b"a", b"b", b"c", b"d", b"e"))
    hashes = [a, b, c, d, e]
    # leaf c (index 2) of 5: its sibling d, then the subtree ab, then e.
    assert merkle.inclusion_proof(hashes, 2) == [d, node(a, b), e]
    assert merkle.inclusion_proof(hashes, 4) == [node(node(a, b), node(c, d))]
    assert merkle.inclusion_proof(hashes[:3], 2) == [node(a, b)]
    assert merkle.inclusion_proof(hashes[:1], 0) == []
    root5 = node(node(node(a, b), node(c, d)), e)
    assert merkle.verify_inclusion(c, 2, 5, [d, node(a, b), e], root5)
    assert not merkle.verify_inclusion(c, 3, 5, [d, node(a, b), e], root5)
    assert not merkle.verify_inclusion(c, 2, 4, [d, node(a, b), e], root5)  # a tree of 4 has paths of 2
    assert not merkle.verify_inclusion(c, 2, 3, [d, node(a, b), e], root5)
    assert not merkle.verify_inclusion(d, 2, 5, [d, node(a, b), e], root5)


CT_LEAVES = [bytes.fromhex(h) for h in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f")]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = [
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]


@pytest.mark.parametrize("n", range(1, 9))
def test_certificate_transparency_roots(n):  # type: ignore[no-untyped-def]
    assert merkle.root(CT_LEAVES[:n]).hex() == CT_ROOTS[n - 1]
    frontier = merkle.Frontier()
    for d in CT_LEAVES[:n]:
        frontier.append(d)
    assert frontier.root().hex() == CT_ROOTS[n - 1]
    resumed = merkle.Frontier(frontier.size, frontier.peaks())  # as a checkpoint stores it
    assert resumed.root() == frontier.root()


@pytest.mark.parametrize("index,size,path", CT_INCLUSION)
def test_certificate_transparency_inclusion_proofs(index, size, path):  # type: ignore[no-untyped-def]
    hashes = [merkle.leaf_hash(d) for d in CT_LEAVES[:size]]
    assert [h.hex() for h in merkle.inclusion_proof(hashes, index)] == path
    root = bytes.fromhex(CT_ROOTS[size - 1])
    assert merkle.verify_inclusion(hashes[index], index, size, [bytes.fromhex(p) for p in path], root)


def test_every_proof_of_every_small_tree_verifies_and_only_there():
    hashes = [merkle.leaf_hash(bytes([i, i * 7 % 256])) for i in range(37)]
    for n in range(1, len(hashes) + 1):
        root = merkle.root_of_leaf_hashes(hashes[:n])
        for i in range(n):
            path = merkle.inclusion_proof(hashes[:n], i)
            assert merkle.verify_inclusion(hashes[i], i, n, path, root)
            if n > 1:
                assert not merkle.verify_inclusion(hashes[i], (i + 1) % n, n, path, root)
                assert not merkle.verify_inclusion(hashes[(i + 1) % n], i, n, path, root)
            if path:
                assert not merkle.verify_inclusion(hashes[i], i, n, path[:-1], root)


def test_proofs_from_subtree_roots_are_the_proofs(monkeypatch):  # type: ignore[no-untyped-def]
    """A log that keeps the roots of some subtrees (`Frontier.on_node`) proves from them."""
    monkeypatch.setattr(merkle, "NODE_STEP", 2)  # every 4 and 16 leaves, so small trees have them
    hashes = [merkle.leaf_hash(bytes([i])) for i in range(37)]
    nodes: dict[tuple[int, int], bytes] = {}
    frontier = merkle.Frontier()
    frontier.on_node = lambda level, index, root: nodes.__setitem__((level, index), root)
    for h in hashes:
        frontier.append_hash(h)
    assert sorted(nodes) == [(2, i) for i in range(9)] + [(4, 0), (4, 1)]
    for (level, index), root in nodes.items():
        assert root == merkle.root_of_leaf_hashes(hashes[index << level:(index + 1) << level])

    def mth(lo: int, hi: int) -> bytes:
        n = hi - lo
        if n & (n - 1) == 0 and lo % n == 0 and (n.bit_length() - 1, lo // n) in nodes:
            return nodes[(n.bit_length() - 1, lo // n)]
        return merkle.root_of_leaf_hashes(hashes[lo:hi])

    for n in range(1, 38):
        for i in range(n):
            assert merkle.inclusion_proof_by_ranges(i, n, mth) == merkle.inclusion_proof(hashes[:n], i)
