"""The shared service: `backfill serve` — HTTP API, users and roles, scheduler, dashboard, webhooks, metrics."""
