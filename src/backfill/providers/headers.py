"""Reading providers' rate-limit and retry-after headers into RateLimitInfo and seconds."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from backfill.request import RateLimitInfo

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(text: str) -> float | None:
    """OpenAI's reset values are Go durations ("1s", "6m0s", "20ms", "1h2m3.5s"); a bare number is seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION_PART.findall(text)
    if not parts or sum(len(n) + len(u) for n, u in parts) != len(text):
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def parse_instant(text: str, now: float | None = None) -> float | None:
    """Anthropic's reset values are RFC 3339 instants; returns seconds from now (never negative)."""
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return max(0.0, at.timestamp() - (time.time() if now is None else now))


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """`retry-after-ms`, else `retry-after` as seconds or an HTTP date; seconds to wait, or None."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


def _int(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return int(float(value))
    except ValueError:
        return None


def _reset(value: str | None, parse: Callable[[str], float | None]) -> float | None:
    return None if value is None else parse(value)


def openai_rate(headers: Mapping[str, str]) -> RateLimitInfo | None:
    """`x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (OpenAI, Azure, compatible servers)."""
    if "x-ratelimit-remaining-requests" not in headers and "x-ratelimit-remaining-tokens" not in headers:
        return None
    return RateLimitInfo(
        limit_requests=_int(headers, "x-ratelimit-limit-requests"),
        remaining_requests=_int(headers, "x-ratelimit-remaining-requests"),
        reset_requests_s=_reset(headers.get("x-ratelimit-reset-requests"), parse_duration),
        limit_tokens=_int(headers, "x-ratelimit-limit-tokens"),
        remaining_tokens=_int(headers, "x-ratelimit-remaining-tokens"),
        reset_tokens_s=_reset(headers.get("x-ratelimit-reset-tokens"), parse_duration),
    )


def anthropic_rate(headers: Mapping[str, str]) -> RateLimitInfo | None:
    """`anthropic-ratelimit-{requests,input-tokens,output-tokens}-{limit,remaining,reset}`.

    The combined `anthropic-ratelimit-tokens-*` headers report whichever of the input and output
    limits is tighter; read as one tokens/min limit they would wrongly charge input and output
    against the smaller one, so they are left out.
    """
    if (
        "anthropic-ratelimit-requests-remaining" not in headers
        and "anthropic-ratelimit-input-tokens-remaining" not in headers
        and "anthropic-ratelimit-output-tokens-remaining" not in headers
    ):
        return None
    return RateLimitInfo(
        limit_requests=_int(headers, "anthropic-ratelimit-requests-limit"),
        remaining_requests=_int(headers, "anthropic-ratelimit-requests-remaining"),
        reset_requests_s=_reset(headers.get("anthropic-ratelimit-requests-reset"), parse_instant),
        limit_input_tokens=_int(headers, "anthropic-ratelimit-input-tokens-limit"),
        remaining_input_tokens=_int(headers, "anthropic-ratelimit-input-tokens-remaining"),
        reset_input_tokens_s=_reset(headers.get("anthropic-ratelimit-input-tokens-reset"), parse_instant),
        limit_output_tokens=_int(headers, "anthropic-ratelimit-output-tokens-limit"),
        remaining_output_tokens=_int(headers, "anthropic-ratelimit-output-tokens-remaining"),
        reset_output_tokens_s=_reset(headers.get("anthropic-ratelimit-output-tokens-reset"), parse_instant),
    )
