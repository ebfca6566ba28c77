"""Plumbing shared by every domain: database, broker, Celery app, object store, errors."""
