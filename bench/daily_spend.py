"""Daily spend quota: what every submit reads, against how much the user charged today.

Before migration 0004 the submit summed the user's settled charges of the day from the
ledger (one row per subtask); now it reads one `daily_spend` row. Prints both reads'
p50 for a user with N settled charges today (rows written directly, in bulk).

    .venv/bin/python bench/daily_spend.py [--n 1000 100000 1000000]
"""
from __future__ import annotations

import argparse
import statistics
import time
import uuid

from harness import stack

LEDGER_SUM = """SELECT COALESCE(SUM(amount), 0) FROM ledger_entries WHERE user_id = :uid
                AND kind IN ('charge', 'charge_failed') AND created_at >= :today AND settled"""
DAY_ROW = "SELECT COALESCE(MAX(charged), 0) FROM daily_spend WHERE user_id = :uid AND day = :day"


def p50_ms(conn, sql: str, params: dict, runs: int = 30) -> float:  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    stmt, times = text(sql), []
    for _ in range(runs):
        start = time.perf_counter()
        conn.execute(stmt, params).scalar()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 100_000, 1_000_000])
    args = parser.parse_args()
    with stack():
        from sqlalchemy import text

        from marketplace.billing.quotas import today_start
        from marketplace.infra.db import get_engine, session_scope
        from marketplace.users.service import create_user

        with session_scope() as session:
            uid = create_user(session, email=f"bench-{uuid.uuid4().hex[:8]}@example.com",
                              password="bench password 123").id
        params = {"uid": uid, "today": today_start(), "day": today_start().date()}
        print(f"{'charges today':>14} {'ledger sum ms':>14} {'daily_spend row ms':>19}")
        done = 0
        with get_engine().connect() as conn:
            for n in sorted(args.n):
                conn.execute(text("""
                    INSERT INTO ledger_entries (user_id, task_id, subtask_id, kind, amount, settled, created_at)
                    SELECT :uid, gen_random_uuid(), gen_random_uuid(), 'charge', -0.001, true,
                           :today + interval '1 second'
                    FROM generate_series(1, :k)"""), {**params, "k": n - done})
                conn.execute(text("""
                    INSERT INTO daily_spend (user_id, day, charged) VALUES (:uid, :day, :amount)
                    ON CONFLICT (user_id, day) DO UPDATE SET charged = EXCLUDED.charged"""),
                    {**params, "amount": n * 0.001})
                conn.commit()
                conn.execute(text("ANALYZE ledger_entries"))
                done = n
                print(f"{n:>14} {p50_ms(conn, LEDGER_SUM, params):>14.2f} {p50_ms(conn, DAY_ROW, params):>19.2f}")


if __name__ == "__main__":
    main()
