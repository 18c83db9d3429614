"""The one error the ledger raises: it cannot be opened, upgraded or written."""

from __future__ import annotations

from backfill.errors import BackfillError


class StoreError(BackfillError):
    """The ledger file is from a newer backfill, or a write to it failed (disk full, read-only file)."""

    exit_code = 1
