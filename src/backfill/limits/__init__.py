"""The limiter per lane: requests/min, tokens/min and in-flight caps, paced evenly, learned from headers."""

from backfill.limits.base import Bound, LaneLimiter, LaneLimits, LimiterStats, Ticket
from backfill.limits.local import Limiter

__all__ = ["Bound", "LaneLimiter", "LaneLimits", "Limiter", "LimiterStats", "Ticket"]
