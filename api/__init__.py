"""The REST gateway: `api.create_app()` composes extensions and blueprints, nothing more."""
from __future__ import annotations

from flask import Flask

from marketplace.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or get_settings()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["marketplace.settings"] = settings

    from api.auth import init_auth
    from api.db import init_db
    from api.errors import register_error_handlers
    from api.views import auth, health, tasks

    init_db(app)
    init_auth(app, settings)
    register_error_handlers(app)
    for bp in (health.bp, auth.bp, tasks.bp):
        app.register_blueprint(bp)
    return app
