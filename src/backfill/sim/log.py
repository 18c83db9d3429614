"""The request log: one entry per request, in memory and optionally appended to a JSONL file.

Tests and benchmarks read it to count statuses, duplicates and the rate actually admitted.
Entries carry a key fingerprint, never the key.
"""

from __future__ import annotations

import bisect
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO


@dataclass(slots=True)
class LogEntry:
    t: float  # seconds since the sim started, when the request arrived (and was admitted or refused)
    key: str  # fingerprint of the API key
    path: str
    model: str
    status: int  # 0: the connection was reset without a response
    request_hash: str
    prompt_tokens: int
    output_tokens: int
    latency_s: float
    admitted: bool  # passed the rate limits (and so counts against them)
    charged_tokens: int  # tokens charged at admission: OpenAI prompt + max_tokens, Anthropic input tokens
    event: str = ""  # "" or a fault ("500", "hang", "reset", ...), "outage", "rate_limited", "quota", ...


@dataclass(frozen=True, slots=True)
class WindowCount:
    start: float
    requests: int
    tokens: int


class RequestLog:
    def __init__(self, path: Path | None = None, in_memory: bool = True) -> None:
        self.entries: list[LogEntry] = []
        self.path = path
        self.in_memory = in_memory
        self._file: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1, encoding="utf-8")  # line-buffered: tail-able

    def append(self, entry: LogEntry) -> None:
        if self.in_memory:
            self.entries.append(entry)
        if self._file is not None:
            self._file.write(json.dumps(asdict(entry), separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __len__(self) -> int:
        return len(self.entries)

    def count_by_status(self) -> Counter[int]:
        return Counter(e.status for e in self.entries)

    def count_by_event(self) -> Counter[str]:
        return Counter(e.event for e in self.entries)

    def duplicates(self) -> dict[str, int]:
        """Request hashes answered 200 more than once, with how often."""
        counts = Counter(e.request_hash for e in self.entries if e.status == 200)
        return {h: n for h, n in counts.items() if n > 1}

    def admitted_per_window(self, window_s: float) -> list[WindowCount]:
        """Admitted requests and charged tokens in consecutive windows from t=0."""
        if not self.entries:
            return []
        last = max(e.t for e in self.entries)
        requests = [0] * (int(last // window_s) + 1)
        tokens = [0] * len(requests)
        for e in self.entries:
            if e.admitted:
                i = int(e.t // window_s)
                requests[i] += 1
                tokens[i] += e.charged_tokens
        return [WindowCount(i * window_s, r, k) for i, (r, k) in enumerate(zip(requests, tokens, strict=True))]

    def peak_window(self, window_s: float) -> WindowCount:
        """The most admitted requests, and separately the most charged tokens, in any window of `window_s`."""
        admitted = sorted((e.t, e.charged_tokens) for e in self.entries if e.admitted)
        times = [t for t, _ in admitted]
        cumulative = [0]
        for _, tokens in admitted:
            cumulative.append(cumulative[-1] + tokens)
        best_requests = best_tokens = 0
        best_start = 0.0
        for i, start in enumerate(times):
            j = bisect.bisect_right(times, start + window_s)
            if j - i > best_requests:
                best_requests, best_start = j - i, start
            best_tokens = max(best_tokens, cumulative[j] - cumulative[i])
        return WindowCount(best_start, best_requests, best_tokens)


def read_jsonl(path: Path) -> list[LogEntry]:
    """Entries written by a sim (possibly another process) with `log_path`."""
    with open(path, encoding="utf-8") as f:
        return [LogEntry(**json.loads(line)) for line in f if line.strip()]
