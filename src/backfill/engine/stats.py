"""Live counters of a running job, read by the progress display, the API and the dashboard."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class JobStats:
    job_id: str
    rows_total: int
    rows_ok: int = 0
    rows_failed: int = 0
    rows_from_cache: int = 0
    rows_before: int = 0  # rows done by earlier runs of this job (resume)
    requests_sent: int = 0  # by this run
    requests_ok: int = 0
    rate_limited: int = 0  # 429s in this run
    requests_before: int = 0  # sent by earlier runs of this job
    rate_limited_before: int = 0
    retries: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    in_flight: int = 0
    tpm_limit: float | None = None
    rpm_limit: float | None = None
    started: float = field(default_factory=time.monotonic)
    # (monotonic time, requests sent, tokens) samples for rates over the last minute
    _samples: deque[tuple[float, int, int]] = field(default_factory=lambda: deque(maxlen=240))

    @property
    def rows_done(self) -> int:
        return self.rows_ok + self.rows_failed

    @property
    def rows_left(self) -> int:
        return max(0, self.rows_total - self.rows_done)

    def sample(self) -> None:
        self._samples.append((time.monotonic(), self.requests_sent, self.input_tokens + self.output_tokens))

    def rates(self, window_s: float = 10.0) -> tuple[float, float]:
        """(requests/s, tokens/min) over the last `window_s` seconds of samples."""
        if len(self._samples) < 2:
            return 0.0, 0.0
        now = self._samples[-1]
        old = next((s for s in self._samples if now[0] - s[0] <= window_s), self._samples[0])
        dt = now[0] - old[0]
        if dt <= 0:
            return 0.0, 0.0
        return (now[1] - old[1]) / dt, (now[2] - old[2]) / dt * 60

    def eta_s(self) -> float | None:
        elapsed = time.monotonic() - self.started
        done = self.rows_done - self.rows_before - self.rows_from_cache
        if done <= 0 or elapsed <= 0:
            return None
        return self.rows_left / (done / elapsed)
