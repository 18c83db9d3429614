"""Durations as a user writes them: `500ms`, `30s`, `10m`, `6h`, `7d`, `2w` or a bare number of seconds."""

from __future__ import annotations

import math
import re

from backfill.errors import SpecError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str | float | int) -> float:
    """'500ms', '30s', '10m', '6h', '7d', '2w', '45' or 45 → seconds (a finite number, not negative)."""
    if isinstance(text, bool):
        raise SpecError(f"Cannot read the duration {text!r}; write a number and a unit, e.g. 500ms, 30s, 10m, 6h or 30d.")
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        m = _DURATION.match(text)
        if m is None:
            raise SpecError(f"Cannot read the duration '{text}'; write a number and a unit, e.g. 500ms, 30s, 10m, 6h or 30d.")
        seconds = float(m.group(1)) * _SECONDS[m.group(2) or "s"]
    if not math.isfinite(seconds) or seconds < 0:
        raise SpecError(f"The duration {text!r} is not a finite number of seconds; write e.g. 30s or 10m.")
    return seconds

