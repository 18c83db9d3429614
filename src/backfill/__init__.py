"""backfill: push large tables through LLMs as fast as the rate limits allow — resumable, exactly once."""

from backfill.api import arun, last_job, run
from backfill.errors import BackfillError, BudgetExceeded, FatalProviderError, Interrupted, SpecError
from backfill.spec import JobSpec

__all__ = ["BackfillError", "BudgetExceeded", "FatalProviderError", "Interrupted", "JobSpec", "SpecError", "arun", "last_job", "run"]
__version__ = "0.1.0"
