"""One database session per request, closed at teardown."""
from __future__ import annotations

from flask import Flask, g
from sqlalchemy.orm import Session

from marketplace.infra.db import new_session


def db() -> Session:
    if "db" not in g:
        g.db = new_session()
    return g.db


def init_db(app: Flask) -> None:
    @app.teardown_appcontext
    def _close(exc: BaseException | None) -> None:
        session = g.pop("db", None)
        if session is not None:
            if exc is not None:
                session.rollback()
            session.close()
