"""Marketplace: a distributed AI task marketplace on Celery.

`celery -A marketplace worker` finds the Celery app here.
"""
from marketplace.infra.celery_app import app

__all__ = ["app"]
