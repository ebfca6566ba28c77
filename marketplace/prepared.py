"""Hot statements that PostgreSQL parses and plans once per connection (PREPARE / EXECUTE).

Every subtask runs its claim and its completion: multi-CTE statements that took
PostgreSQL longer to plan than to run (pg_stat_statements over a 1,000-subtask
job: the completion 0.66 ms planning and 0.73 ms executing, the claim 0.48 and
0.18). psycopg2 has no prepared statements of its own, so a `Prepared` keeps
the SQL-level ones: prepared on a connection's first use (the set of names
lives in the pooled connection's `info`, which SQLAlchemy clears when it
reconnects) and executed by name after that. Each parameter's type is declared:
PostgreSQL cannot infer one used both as a column value and inside a CAST.
"""
from __future__ import annotations

import re
from typing import Any

from sqlalchemy.engine import Connection, CursorResult

# SQLAlchemy's own rule for `:name` in text(): not `::type` casts, not `\:` escapes.
_BIND = re.compile(r"(?<![:\w\\]):(\w+)(?!:)")
_PREPARED = "marketplace.prepared"


class Prepared:
    """`sql` with `:name` parameters as in text(); `types` maps every name to its SQL type."""

    def __init__(self, name: str, sql: str, types: dict[str, str]) -> None:
        self.name = name
        self.params: list[str] = []
        body = _BIND.sub(self._number, sql)
        untyped = [p for p in self.params if p not in types]
        if untyped:
            raise ValueError(f"prepared statement {name}: no type for {', '.join(untyped)}")
        self.sql = f"PREPARE {name} ({', '.join(types[p] for p in self.params)}) AS {body}"
        self._execute = f"EXECUTE {name}({', '.join(['%s'] * len(self.params))})" if self.params else f"EXECUTE {name}"

    def _number(self, match: re.Match[str]) -> str:
        if match.group(1) not in self.params:
            self.params.append(match.group(1))
        return f"${self.params.index(match.group(1)) + 1}"

    def execute(self, conn: Connection, params: dict[str, Any]) -> CursorResult[Any]:
        prepared = conn.connection.info.setdefault(_PREPARED, set())
        if self.name not in prepared:
            conn.exec_driver_sql(self.sql)
            prepared.add(self.name)
        return conn.exec_driver_sql(self._execute, tuple(params[p] for p in self.params))
