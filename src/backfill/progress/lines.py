"""Progress as log lines, for a log that no one watches live (nohup, CI, a scheduler): plain text or one JSON object per line."""

from __future__ import annotations

import datetime as dt
import enum
import json
from typing import IO

from backfill.progress.view import Snapshot, line


class LogFormat(str, enum.Enum):
    TEXT = "text"
    JSON = "json"


class Event(str, enum.Enum):
    START = "start"
    PROGRESS = "progress"
    END = "end"


_TEXT_VERB = {Event.START: "started", Event.PROGRESS: "running", Event.END: "ended"}


def format_line(event: Event, snap: Snapshot, fmt: LogFormat, now: dt.datetime | None = None) -> str:
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    if fmt is LogFormat.JSON:
        return json.dumps({"time": stamp, "event": event.value, **snap.to_dict()}, separators=(",", ":"))
    return f"{stamp} backfill {_TEXT_VERB[event]} {line(snap)}"


def write_line(out: IO[str], event: Event, snap: Snapshot, fmt: LogFormat) -> None:
    # Straight to the file, not through rich: a log line is never wrapped at a guessed width nor read as markup.
    out.write(format_line(event, snap, fmt) + "\n")
    out.flush()
