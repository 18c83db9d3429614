"""backfill: push large tables through LLMs as fast as the rate limits allow — resumable, exactly once."""

from backfill.api import arun, run
from backfill.errors import BackfillError, BudgetExceeded, FatalProviderError, SpecError
from backfill.spec import JobSpec

__all__ = ["BackfillError", "BudgetExceeded", "FatalProviderError", "JobSpec", "SpecError", "arun", "run"]
__version__ = "0.1.0"
