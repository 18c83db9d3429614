"""Faults on demand and scheduled outages.

Fault choice is reproducible for a given seed but does not depend on the request: the n-th
admitted request of a server draws the n-th number of one seeded generator, so a retried request
can succeed where its first try failed.
"""

from __future__ import annotations

import enum
import random

from backfill.sim.config import Faults, Outage


class Fault(enum.StrEnum):
    ERROR_500 = "500"
    ERROR_503 = "503"
    ERROR_529 = "529"
    HANG = "hang"
    RESET = "reset"
    MALFORMED = "malformed"
    TRUNCATE = "truncate"


class FaultInjector:
    """Draws a fault (or none) for each admitted request, and says which outage covers a moment."""

    def __init__(self, faults: Faults, outages: list[Outage], seed: int) -> None:
        self._rng = random.Random(seed)
        self._outages = sorted(outages, key=lambda o: o.start_s)
        self._table = [
            (rate, fault)
            for rate, fault in (
                (faults.error_500, Fault.ERROR_500),
                (faults.error_503, Fault.ERROR_503),
                (faults.error_529, Fault.ERROR_529),
                (faults.hang, Fault.HANG),
                (faults.reset, Fault.RESET),
                (faults.malformed, Fault.MALFORMED),
                (faults.truncate, Fault.TRUNCATE),
            )
            if rate > 0
        ]

    def draw(self) -> Fault | None:
        if not self._table:
            return None
        u = self._rng.random()
        for rate, fault in self._table:
            if u < rate:
                return fault
            u -= rate
        return None

    def outage_at(self, t: float) -> Outage | None:
        for outage in self._outages:
            if outage.start_s <= t < outage.end_s:
                return outage
        return None
