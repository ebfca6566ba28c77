"""Webhooks: where a user's URL may point, and the delivery task."""
