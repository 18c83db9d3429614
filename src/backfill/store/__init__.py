"""The durable ledger: jobs, chunks, dead letters, events and the response cache."""

from backfill.store.sqlite import CachedResponse, DeadLetter, JobRecord, Store

__all__ = ["CachedResponse", "DeadLetter", "JobRecord", "Store"]
