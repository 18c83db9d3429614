"""What the operator caps, server-wide (`PUT /settings`) and per user (`PATCH /users/{name}`), and how a job spec
is held to it at submit. No web imports here: the `users` commands read these too, and start fast."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from backfill.errors import BackfillError
from backfill.spec import PriceSpec

# A JSON request (a job spec) larger than this is refused unless the operator raises it.
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024


class Caps(BaseModel):
    """Limits a job of one user must stay within; None: no limit from this level."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_rows: int | None = Field(None, ge=1, description="The largest job, in rows.")
    max_tokens: int | None = Field(None, ge=1, description="The largest max_tokens a request may ask (and the default).")
    max_attempts: int | None = Field(None, ge=1, description="The most attempts per row (retries.max_attempts).")
    max_in_flight: int | None = Field(None, ge=1, description="The most requests in flight per job (limits.max_in_flight).")
    max_chunk_size: int | None = Field(None, ge=1, description="The largest chunk_size.")
    default_budget_usd: float | None = Field(None, gt=0, description="The budget of a job that sets none.")
    max_upload_bytes: int | None = Field(None, ge=1, description="The largest upload.")
    upload_retention_days: float | None = Field(None, gt=0, description="Uploads older than this are deleted.")

    def over(self, user: Caps) -> Caps:
        """These caps (only the caps, of a Settings too) with the user's own values where set: an operator may
        give one user more or less than everyone else."""
        mine = self.model_dump(include=set(Caps.model_fields))
        return Caps(**{**mine, **{k: v for k, v in user.model_dump().items() if v is not None}})


class Settings(Caps):
    """Server-wide settings: the caps every user starts from, and the prices the server bills by."""

    max_jobs_per_user: int | None = Field(None, ge=1, description="Jobs one user runs at once; default: half of --max-jobs.")
    max_body_bytes: int | None = Field(None, ge=1024, description=f"The largest JSON request body (default {DEFAULT_MAX_BODY_BYTES:,}).")
    prices: dict[str, PriceSpec] = Field(default_factory=dict, description="USD per 1M tokens, by model; the server bills by these.")


class CapExceeded(BackfillError):
    """A job over one of the operator's caps (a 400 that names the cap)."""


def caps_from_json(text: str | None) -> Caps:
    return Caps.model_validate(json.loads(text)) if text else Caps()


def fair_jobs_per_user(max_running: int) -> int:
    """One user's slots by default: half the server's, so that one user's stuck jobs cannot fill them all."""
    return max(1, max_running // 2)


def hold_to_caps(spec: dict[str, Any], given: dict[str, Any], caps: Caps) -> None:
    """Apply `caps` to a built spec (`given` is what the user sent): a value over a cap is a 400 naming it;
    a value the user left unset is lowered to the cap."""
    task, limits, retries = spec["task"], spec["limits"], spec["retries"]
    given_task, given_limits, given_retries = given.get("task") or {}, given.get("limits") or {}, given.get("retries") or {}
    if task.get("kind", "chat") == "chat":  # an embedding has no output to cap
        params = task.setdefault("params", {})
        _cap(params, given_task.get("params") or {}, "max_tokens", caps.max_tokens, "max_tokens", "task.params.max_tokens")
    _cap(retries, given_retries, "max_attempts", caps.max_attempts, "max_attempts", "retries.max_attempts")
    _cap(limits, given_limits, "max_in_flight", caps.max_in_flight, "max_in_flight", "limits.max_in_flight")
    _cap(spec, given, "chunk_size", caps.max_chunk_size, "max_chunk_size", "chunk_size")
    if caps.default_budget_usd is not None and spec["budget"].get("usd") is None:
        spec["budget"]["usd"] = caps.default_budget_usd


def _cap(target: dict[str, Any], given: dict[str, Any], key: str, cap: int | None, cap_name: str, field: str) -> None:
    if cap is None:
        return
    if key in given and given[key] is not None:
        value = target.get(key)  # as validated (given may hold "5" where the spec holds 5)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CapExceeded(f"{field} must be a number on this server (it caps {cap_name} at {cap}).")
        if value > cap:
            raise CapExceeded(f"{field} is {value}, over this server's cap {cap_name} = {cap}; lower it or ask an operator.")
        return
    if key not in target or target[key] is None or target[key] > cap:
        target[key] = cap


def check_rows(rows: int, caps: Caps) -> None:
    if caps.max_rows is not None and rows > caps.max_rows:
        raise CapExceeded(f"The input has {rows:,} rows, over this server's cap max_rows = {caps.max_rows:,}; split it or ask an operator.")
