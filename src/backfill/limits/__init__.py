"""The limiter per lane: requests/min, tokens/min and in-flight caps, paced evenly, learned from headers."""

from backfill.limits.base import LaneLimiter, LaneLimits, LimiterStats, Ticket
from backfill.limits.local import Limiter

__all__ = ["LaneLimiter", "LaneLimits", "Limiter", "LimiterStats", "Ticket"]
