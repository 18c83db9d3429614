"""A job's status and, when it stopped without finishing, its stop cause: enums, never parsed from text."""

from __future__ import annotations

import enum


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


class StopCause(str, enum.Enum):
    """Why a job stopped before it finished; stored beside the status."""

    BUDGET = "budget"  # spending reached --budget-usd
    INTERRUPT = "interrupt"  # Ctrl-C or SIGTERM in the process running it
    PAUSE = "pause"  # paused by request (CLI, server)
    CANCEL = "cancel"  # cancelled by request
    QUOTA = "quota"  # the provider's quota or credit is exhausted
    SHUTDOWN = "shutdown"  # the server running it shut down
    DETACHED = "detached"  # batches left at the provider; resume collects them
    FATAL = "fatal"  # an error no retry cures: bad key, unknown model, a bug

    def __str__(self) -> str:
        return self.value
