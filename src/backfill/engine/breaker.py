"""Circuit breaker: when most recent requests fail transiently, pause dispatch instead of burning attempts."""

from __future__ import annotations

import asyncio
from collections import deque


class CircuitBreaker:
    """Opens when the share of transient failures in the last `window` outcomes passes `threshold`.

    While open, dispatch waits `cooldown_s` (doubling while failures go on, up to
    `max_cooldown_s`), then lets traffic through again (half-open); one success
    closes it.
    """

    def __init__(self, window: int = 50, threshold: float = 0.6, cooldown_s: float = 2.0, max_cooldown_s: float = 30.0):
        self._recent: deque[bool] = deque(maxlen=window)
        self._failures = 0
        self._threshold = threshold
        self._base = cooldown_s
        self._cooldown = cooldown_s
        self._max = max_cooldown_s
        self._closed = asyncio.Event()
        self._closed.set()
        self.opened = 0

    def record(self, failed: bool) -> None:
        if len(self._recent) == self._recent.maxlen:
            self._failures -= self._recent[0]
        self._recent.append(failed)
        self._failures += failed
        if not failed:
            self._cooldown = self._base
            return
        full = len(self._recent) == self._recent.maxlen
        if full and self._closed.is_set() and self._failures / len(self._recent) > self._threshold:
            self._open()

    def _open(self) -> None:
        self.opened += 1
        self._closed.clear()
        self._recent.clear()
        self._failures = 0
        asyncio.get_running_loop().call_later(self._cooldown, self._closed.set)
        self._cooldown = min(self._max, self._cooldown * 2)

    @property
    def is_open(self) -> bool:
        return not self._closed.is_set()

    async def wait(self) -> None:
        if not self._closed.is_set():
            await self._closed.wait()
