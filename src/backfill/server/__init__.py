"""The shared service: `backfill serve` — HTTP API, users and roles, scheduler, dashboard, webhooks, metrics."""

from backfill.server.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
