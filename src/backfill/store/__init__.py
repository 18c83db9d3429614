"""The durable ledger: jobs, chunks, dead letters, events, leases and the response cache."""

from backfill.store.errors import StoreError
from backfill.store.migrate import MIGRATIONS, Migration, migrate
from backfill.store.sqlite import CachedResponse, DeadLetter, JobRecord, Store

__all__ = ["MIGRATIONS", "CachedResponse", "DeadLetter", "JobRecord", "Migration", "Store", "StoreError", "migrate"]
