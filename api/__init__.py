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
    if settings.trusted_proxies:
        # The client's address (rate limits, logs) is the one the trusted proxies saw, not theirs.
        from werkzeug.middleware.proxy_fix import ProxyFix

        n = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n)  # type: ignore[method-assign]

    from api import openapi
    from api.auth import init_auth
    from api.db import init_db
    from api.errors import register_error_handlers
    from api.limits import init_limiter
    from api.views import auth, files, health, models, tasks, workers
    from marketplace import observability

    init_db(app)
    init_auth(app, settings)
    register_error_handlers(app)
    init_limiter(app, settings)
    observability.init_app(app, settings)  # /metrics (no auth), request metrics and traces
    for bp in (health.bp, auth.bp, auth.me_bp, tasks.bp, files.bp, openapi.bp, models.bp, workers.bp):
        app.register_blueprint(bp)
    from api.views import audit as audit_views
    from api.views import billing as billing_views
    from api.views import providers as providers_views
    app.register_blueprint(billing_views.bp)
    app.register_blueprint(audit_views.bp)
    app.register_blueprint(audit_views.receipts_bp)
    app.register_blueprint(providers_views.bp)
    return app
