"""Agreement per model, the quorum's verdict and the reputation score, on hand-written values."""
from __future__ import annotations

from typing import Any, NamedTuple

import pytest

from marketplace.registry.reputation import wilson_lower_bound
from marketplace.results.quorum import agree, judge, quorum_of


def test_echo_and_generic_agree_on_equal_json_only():
    assert agree("echo", [{"a": 1, "b": [1, 2]}], [{"b": [1, 2], "a": 1}])
    assert not agree("echo", [{"a": 1}], [{"a": 1.5}])
    assert not agree("generic", [1, 2], [1])


def test_embeddings_agree_within_the_tolerance():
    a = [0.1, 0.2, 0.3, -0.4]
    assert agree("embedding", [a], [[0.10005, 0.19995, 0.3, -0.40009]])  # each within 1e-4
    assert not agree("embedding", [a], [[0.1002, 0.2, 0.3, -0.4]])  # 2e-4 apart
    assert not agree("embedding", [a], [[0.1, 0.2, 0.3]])  # another length


def test_resnet50_agrees_on_the_top1_class_and_close_scores():
    one = [{"label": "tabby", "index": 281, "score": 0.71}, {"label": "tiger cat", "index": 282, "score": 0.2}]
    close = [{"label": "tabby", "index": 281, "score": 0.7105}, {"label": "tiger cat", "index": 282, "score": 0.2}]
    other_top = [{"label": "tiger cat", "index": 282, "score": 0.5}, {"label": "tabby", "index": 281, "score": 0.4}]
    far = [{"label": "tabby", "index": 281, "score": 0.75}, {"label": "tiger cat", "index": 282, "score": 0.2}]
    assert agree("resnet50", [one], [close])
    assert not agree("resnet50", [one], [other_top])
    assert not agree("resnet50", [one], [far])


def test_the_quorum_is_a_majority_of_the_planned_runs():
    assert [quorum_of(k) for k in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]


@pytest.mark.parametrize(("agreed", "total", "expected"), [
    (0, 0, 0.0), (0, 3, 0.0), (1, 1, 0.2065), (10, 10, 0.7225), (20, 21, 0.7733), (50, 100, 0.4038)])
def test_the_score_is_the_wilson_lower_bound(agreed, total, expected):
    assert round(wilson_lower_bound(agreed, total), 4) == expected


class Run(NamedTuple):
    index: int
    replica: int
    worker: str
    result_sha256: str
    result_key: str
    id: str = "x"


class Store:
    def __init__(self, parts: dict[str, Any]) -> None:
        self.parts = parts

    def get_bytes(self, key: str) -> bytes:
        import json

        return json.dumps(self.parts[key]).encode()


def test_the_verdict_accepts_the_majority_asks_for_more_or_gives_up(stack):
    runs = [Run(0, 0, "a", "h1", "k0"), Run(0, 1, "b", "h2", "k1"), Run(0, 2, "c", "h1", "k2"),  # 2 of 3 agree
            Run(1, 0, "a", "h3", "k3"), Run(1, 1, "b", "h4", "k4")]  # k=3 but 2 runs, disagreeing
    store = Store({"k1": ["x"], "k0": ["y"], "k2": ["y"], "k3": ["p"], "k4": ["q"]})
    verdict = judge(model="echo", redundancy=3, runs=runs, store=store)
    assert verdict.accepted[0] == runs[0] and [r.worker for r in verdict.disagreed] == ["b"]
    assert verdict.more == {1: 1}  # one more agreeing run makes 2 of 3
    # Two nodes that disagree, and no room for more: the task fails with the reason.
    from tests.support.env import switched_env

    with switched_env(MARKETPLACE_EXTRA_REPLICAS="0"):
        verdict = judge(model="echo", redundancy=2, runs=runs[3:], store=store)
    assert verdict.failed == {1: "2 nodes disagreed on subtask 1: no 2 of them returned the same output"}
