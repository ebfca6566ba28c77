"""Hot statements that PostgreSQL parses and plans once per connection (PREPARE / EXECUTE).

Every subtask runs its claim and its completion: multi-CTE statements that took
PostgreSQL longer to plan than to run (pg_stat_statements over a 1,000-subtask
job: the completion 0.66 ms planning and 0.73 ms executing, the claim 0.48 and
0.18). psycopg2 has no prepared statements of its own, so a `Prepared` keeps
the SQL-level ones: prepared on a connection's first use (the set of names
lives in the pooled connection's `info`, which SQLAlchemy clears when it
reconnects) and executed by name after that. Each parameter's type is declared:
PostgreSQL cannot infer one used both as a column value and inside a CAST.

The EXECUTE runs on the driver's cursor: SQLAlchemy builds a result's metadata from the
cursor's description at every driver-level statement (it caches it only for compiled
ones), ~8% of a pool process's CPU in a fan-out of single-item subtasks. Its errors
still go through SQLAlchemy (the same exception types; a dropped connection is
invalidated), and where anything listens to statements (SQL tracing, a test that
counts them) the statement takes SQLAlchemy's own path, so that they see it.

Behind a transaction-mode pooler (PgBouncer `pool_mode = transaction`) a client's next
transaction may run on a server connection that never prepared the name. An engine
given `send_inline` sends each statement's whole text instead, every parameter cast to
its declared type, so it means the same; PostgreSQL plans it at every call.
"""
from __future__ import annotations

import logging
import re
from collections import namedtuple
from functools import lru_cache
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, MultipleResultsFound, NoResultFound

logger = logging.getLogger(__name__)

# SQLAlchemy's own rule for `:name` in text(): not `::type` casts, not `\:` escapes.
_BIND = re.compile(r"(?<![:\w\\]):(\w+)(?!:)")
_PREPARED = "marketplace.prepared"
_INLINE = "marketplace.prepared.inline"
# invalid_sql_statement_name, duplicate_prepared_statement: what a transaction-mode pooler does
# to prepared names, each transaction on another server connection.
_NAME_LOST = ("26000", "42P05")


def send_inline(engine: Engine) -> None:
    """Every `Prepared` runs as plain SQL on this engine's connections (no PREPARE): for a
    pooler that hands each transaction whichever server connection is free."""

    @event.listens_for(engine, "connect")
    def _inline(_dbapi_conn: Any, record: Any) -> None:
        record.info[_INLINE] = True


class Prepared:
    """`sql` with `:name` parameters as in text(); `types` maps every name to its SQL type."""

    def __init__(self, name: str, sql: str, types: dict[str, str]) -> None:
        self.name = name
        self.params: list[str] = []
        # Both texts go to the driver with parameters (SQLAlchemy passes empty ones), which reads
        # `%` as a placeholder: a literal one is escaped.
        escaped = sql.replace("%", "%%")
        body = _BIND.sub(self._number, escaped)
        untyped = [p for p in self.params if p not in types]
        if untyped:
            raise ValueError(f"prepared statement {name}: no type for {', '.join(untyped)}")
        signature = f" ({', '.join(types[p] for p in self.params)})" if self.params else ""  # `()` is a syntax error
        self.sql = f"PREPARE {name}{signature} AS {body}"
        self._execute = f"EXECUTE {name}({', '.join(['%s'] * len(self.params))})" if self.params else f"EXECUTE {name}"
        # `send_inline`'s text: pyformat parameters (a name used twice is sent once).
        self.inline = _BIND.sub(lambda m: f"CAST(%({m.group(1)})s AS {types[m.group(1)]})", escaped)

    def _number(self, match: re.Match[str]) -> str:
        if match.group(1) not in self.params:
            self.params.append(match.group(1))
        return f"${self.params.index(match.group(1)) + 1}"

    def execute(self, conn: Connection, params: dict[str, Any]) -> Any:
        """The statement's rows: `first()`, `one()`, `scalar()`, `scalar_one()`, `all()`, as on a result."""
        try:
            return self._run(conn, params)
        except DBAPIError as exc:
            if getattr(exc.orig, "pgcode", None) in _NAME_LOST:
                logger.error("prepared statement %s: %s. Behind a transaction-mode pooler (PgBouncer "
                             "pool_mode = transaction) set MARKETPLACE_DATABASE_TRANSACTION_POOLING=true",
                             self.name, str(exc.orig).strip())
            raise

    def _run(self, conn: Connection, params: dict[str, Any]) -> Any:
        info = conn.connection.info
        statement: str
        args: Any
        if info.get(_INLINE):
            statement, args = self.inline, {p: params[p] for p in self.params}
        else:
            prepared = info.setdefault(_PREPARED, set())
            if self.name not in prepared:
                conn.exec_driver_sql(self.sql)
                prepared.add(self.name)
            statement, args = self._execute, tuple(params[p] for p in self.params)
        if conn.dispatch.before_cursor_execute or conn.dispatch.after_cursor_execute:
            return conn.exec_driver_sql(statement, args)
        if not conn.in_transaction():
            conn.begin()  # as SQLAlchemy's own execute would (autobegin): the caller's commit ends it
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            cursor.execute(statement, args)
            if cursor.description is None:
                return Rows([])
            row = _row_type(tuple(c[0] for c in cursor.description))
            return Rows([row._make(r) for r in cursor.fetchall()])
        except Exception as exc:
            conn._handle_dbapi_exception(exc, statement, args, cursor, None)
            raise  # not reached: the call above raises SQLAlchemy's wrapping of `exc`
        finally:
            cursor.close()


@lru_cache(maxsize=64)
def _row_type(columns: tuple[str, ...]) -> Any:
    return namedtuple("Row", columns, rename=True)  # type: ignore[misc]


class Rows:
    """A prepared statement's rows, read with a CursorResult's methods."""

    __slots__ = ("_rows",)

    def __init__(self, rows: list[Any]) -> None:
        self._rows = rows

    def all(self) -> list[Any]:
        return self._rows

    def __iter__(self) -> Any:
        return iter(self._rows)

    def first(self) -> Any:
        return self._rows[0] if self._rows else None

    def one(self) -> Any:
        if not self._rows:
            raise NoResultFound("No row was found when one was required")
        if len(self._rows) > 1:
            raise MultipleResultsFound("Multiple rows were found when exactly one was required")
        return self._rows[0]

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None

    def scalar_one(self) -> Any:
        return self.one()[0]
