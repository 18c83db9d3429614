"""Live counters of a running job, read by the progress display, the log lines, the API and the dashboard."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

from backfill.limits.base import Bound

# The binding limit shown is the one seen most often over this many watcher samples (about 5 s):
# a single sample catches the limiter between two admissions and flickers.
BINDING_SAMPLES = 10


@dataclass
class JobStats:
    job_id: str
    rows_total: int
    rows_ok: int = 0  # answered (committed or not), all runs of the job together
    rows_failed: int = 0
    rows_committed: int = 0  # rows of committed chunks, as the ledger counts them (all runs)
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
    # Tokens the limiter reserved at admission (prompt and max_tokens): what a provider that counts max_tokens
    # (OpenAI) holds against tokens/min, far above the tokens used when max_tokens is large or unset.
    tokens_reserved: int = 0
    cost_usd: float = 0.0  # spent, all runs of the job together
    budget_usd: float | None = None
    in_flight: int = 0
    max_in_flight: int | None = None
    tpm_limit: float | None = None
    rpm_limit: float | None = None
    input_tpm_limit: float | None = None
    output_tpm_limit: float | None = None
    # Output tokens each request reserves when the job leaves max_tokens unset (plan.UNSET_MAX_TOKENS_RESERVE); else None.
    unset_max_tokens_reserve: int | None = None
    started: float = field(default_factory=time.monotonic)
    # (monotonic time, requests sent, tokens used, rows done, tokens reserved) samples for rates over the last minute
    _samples: deque[tuple[float, int, int, int, int]] = field(default_factory=lambda: deque(maxlen=240))
    _bindings: deque[Bound | None] = field(default_factory=lambda: deque(maxlen=BINDING_SAMPLES))
    _budget_bound: bool = False

    @property
    def rows_done(self) -> int:
        return self.rows_ok + self.rows_failed

    @property
    def rows_left(self) -> int:
        return max(0, self.rows_total - self.rows_done)

    @property
    def rows_answered_not_committed(self) -> int:
        return max(0, self.rows_done - self.rows_committed)

    @property
    def requests(self) -> int:
        """Requests sent, all runs of the job together (the ledger's count)."""
        return self.requests_before + self.requests_sent

    @property
    def rate_limited_total(self) -> int:
        return self.rate_limited_before + self.rate_limited

    def sample(self, binding: Bound | None = None) -> None:
        """Record the counters now, and what held the limiter back at this moment (None: nothing did)."""
        self._samples.append(
            (time.monotonic(), self.requests_sent, self.input_tokens + self.output_tokens, self.rows_done, self.tokens_reserved)
        )
        self._bindings.append(binding)

    def budget_reached(self) -> None:
        self._budget_bound = True

    def binding(self) -> Bound | None:
        """The limit that held the pace back most often over the last few seconds; None when no limit did
        (the provider's answers, or reading the input, set the pace)."""
        if self._budget_bound:
            return Bound.BUDGET
        seen = Counter(b for b in self._bindings if b is not None)
        if not seen or sum(seen.values()) * 2 < len(self._bindings):
            return None
        return seen.most_common(1)[0][0]

    def rates(self, window_s: float = 10.0) -> tuple[float, float]:
        """(requests/s, tokens/min) over the last `window_s` seconds of samples."""
        rps, tpm, _, _ = self._rates(window_s)
        return rps, tpm

    def requests_per_min(self) -> float:
        """Requests sent in the trailing minute, counted as a provider counts them against its requests/min limit
        (not a short burst scaled up to a minute, which can read above a limit the provider never saw passed)."""
        return self._in_last_minute()[0]

    def tokens_per_min(self) -> float:
        return self._in_last_minute()[1]

    def tokens_reserved_per_min(self) -> float:
        return self._in_last_minute()[2]

    def _in_last_minute(self) -> tuple[int, int, int]:
        """(requests, tokens used, tokens reserved) between the sample a minute ago (or the first) and the last."""
        if len(self._samples) < 2:
            return 0, 0, 0
        now = self._samples[-1]
        old = next((s for s in self._samples if now[0] - s[0] <= 60.0), self._samples[0])
        return now[1] - old[1], now[2] - old[2], now[4] - old[4]

    def rows_per_s(self) -> float:
        return self._rates(10.0)[2]

    def _rates(self, window_s: float) -> tuple[float, float, float, float]:
        """(requests/s, tokens used/min, rows/s, tokens reserved/min) over the last `window_s` seconds."""
        if len(self._samples) < 2:
            return 0.0, 0.0, 0.0, 0.0
        now = self._samples[-1]
        old = next((s for s in self._samples if now[0] - s[0] <= window_s), self._samples[0])
        dt = now[0] - old[0]
        if dt <= 0:
            return 0.0, 0.0, 0.0, 0.0
        return (now[1] - old[1]) / dt, (now[2] - old[2]) / dt * 60, (now[3] - old[3]) / dt, (now[4] - old[4]) / dt * 60

    def eta_s(self) -> float | None:
        elapsed = time.monotonic() - self.started
        done = self.rows_done - self.rows_before - self.rows_from_cache
        if done <= 0 or elapsed <= 0:
            return None
        return self.rows_left / (done / elapsed)
