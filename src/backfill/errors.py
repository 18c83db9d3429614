"""User-facing errors: each carries one or two sentences saying what went wrong and what to do."""

from __future__ import annotations


class BackfillError(Exception):
    """An error a user sees without a traceback (unless --debug). The message is the whole story."""

    exit_code = 1


class SpecError(BackfillError):
    """The job spec is wrong; found before anything was sent."""

    exit_code = 2


class FatalProviderError(BackfillError):
    """The provider refused the whole job (bad key, unknown model, quota exhausted)."""

    exit_code = 3


class BudgetExceeded(BackfillError):
    """The estimate or the spend reached the budget."""

    exit_code = 4


class JobBusy(BackfillError):
    """Another process holds the job's lease (it is running there)."""

    exit_code = 6


class Interrupted(BackfillError):
    """Stopped by Ctrl-C or SIGTERM before the job started (while waiting for its lease)."""

    exit_code = 130
