"""Webhooks: a job's end (succeeded, failed, cancelled, budget stop) is POSTed to its webhook, signed
with HMAC-SHA256 under the owner's webhook secret, and retried with exponential backoff. Deliveries
live in the server's database, so a restart keeps retrying them."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time

import aiohttp

from backfill.server.db import Delivery, ServerDB
from backfill.server.logs import log

SIGNATURE_HEADER = "X-Backfill-Signature"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value: `t=TIMESTAMP,v1=HEX` where HEX = HMAC-SHA256(secret, "TIMESTAMP." + body)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, tolerance_s: float = 300.0, now: float | None = None) -> bool:
    """What a receiver runs: the signature matches the body and is recent (a replay of an old one fails)."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        timestamp = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs((now if now is not None else time.time()) - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), header)


class Webhooks:
    """Sends due deliveries; `notify` queues one and wakes the sender."""

    def __init__(self, db: ServerDB, *, backoff_s: float = 2.0, max_attempts: int = 8, timeout_s: float = 10.0):
        self.db = db
        self.backoff_s = backoff_s
        self.max_attempts = max_attempts
        self.timeout_s = timeout_s
        self._wake = asyncio.Event()

    def notify(self, job_id: str, owner: str, url: str, event: str, payload: dict[str, object]) -> None:
        self.db.add_delivery(job_id, owner, url, event, json.dumps(payload, sort_keys=True))
        self._wake.set()

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                now = time.time()
                due = self.db.due_deliveries(now)
                if due:
                    await asyncio.gather(*(self._send(session, d) for d in due))
                    continue
                nxt = self.db.next_delivery_at()
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=None if nxt is None else max(0.0, nxt - now))
                except TimeoutError:
                    pass

    async def _send(self, session: aiohttp.ClientSession, d: Delivery) -> None:
        user = self.db.get_user(d.owner)
        if user is None:
            self.db.delivery_done(d.id, d.attempts, "the job's owner was removed")
            return
        body = d.body.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "backfill-webhooks",
            "X-Backfill-Event": d.event,
            "X-Backfill-Delivery": str(d.id),
            SIGNATURE_HEADER: sign(user.webhook_secret, int(time.time()), body),
        }
        attempts = d.attempts + 1
        extra = {"job_id": d.job_id, "user": d.owner, "event": d.event, "delivery": d.id}
        try:
            async with session.post(d.url, data=body, headers=headers) as resp:
                if 200 <= resp.status < 300:
                    self.db.delivery_done(d.id, attempts, None)
                    log.info("webhook delivered", extra={**extra, "status": resp.status})
                    return
                error = f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            error = f"{type(e).__name__}: {e}"
        if attempts >= self.max_attempts:
            self.db.delivery_done(d.id, attempts, error)
            log.warning("webhook given up after %d attempts: %s", attempts, error, extra=extra)
            return
        delay = self.backoff_s * 2 ** (attempts - 1)
        self.db.delivery_retry(d.id, attempts, time.time() + delay, error)
        log.info("webhook failed (%s); retry in %.1f s", error, delay, extra=extra)
