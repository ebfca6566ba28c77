"""Reading many objects at once (a task's parts, for its result) on both stores."""
from __future__ import annotations

import uuid

import pytest


def _stores(tmp_path):  # type: ignore[no-untyped-def]
    from marketplace.infra.storage import LocalStore, get_store

    return [get_store(), LocalStore(tmp_path)]  # S3 (moto's server, from the stack), a directory


def test_get_many_returns_every_object_in_the_order_asked(stack, tmp_path):  # type: ignore[no-untyped-def]
    for store in _stores(tmp_path):
        prefix = f"results/{uuid.uuid4()}"
        keys = [f"{prefix}/part-{i:05d}.json" for i in range(40)]
        for i, key in enumerate(keys):
            store.put_bytes(key, f"[{i}]".encode(), "application/json")
        order = keys[::-1] + keys[:3]  # reversed, and a key asked twice
        assert list(store.get_many(order)) == [store.get_bytes(k) for k in order], type(store).__name__
        assert list(store.get_many([])) == []


def test_get_many_raises_for_a_missing_object(stack, tmp_path):  # type: ignore[no-untyped-def]
    from marketplace.infra.storage import ObjectNotFound

    for store in _stores(tmp_path):
        prefix = f"results/{uuid.uuid4()}"
        store.put_bytes(f"{prefix}/a.json", b"[1]")
        with pytest.raises(ObjectNotFound):
            list(store.get_many([f"{prefix}/a.json", f"{prefix}/missing.json", f"{prefix}/a.json"]))


def test_s3_reads_a_task_s_parts_concurrently(stack):  # type: ignore[no-untyped-def]
    """Several GETs in flight at once: each waits on the network, not on this process."""
    import threading

    from marketplace.infra.storage import PARALLEL_GETS, get_store

    store = get_store()
    prefix = f"results/{uuid.uuid4()}"
    keys = [f"{prefix}/part-{i:05d}.json" for i in range(24)]
    for key in keys:
        store.put_bytes(key, b"[0]")
    in_flight, peak, lock = [0], [0], threading.Lock()
    original = store.get_bytes

    def counting(key: str) -> bytes:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        try:
            return original(key)
        finally:
            with lock:
                in_flight[0] -= 1

    store.get_bytes = counting  # type: ignore[method-assign]
    try:
        assert len(list(store.get_many(keys))) == len(keys)
    finally:
        del store.get_bytes
    assert 1 < peak[0] <= PARALLEL_GETS
