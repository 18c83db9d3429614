"""Webhooks: a job's end (succeeded, failed, cancelled, budget stop) is POSTed to its webhook, signed
with HMAC-SHA256 under the owner's webhook secret, and retried with exponential backoff. Deliveries
live in the server's database, so a restart keeps retrying them; each is sent on its own, and only to
public addresses (checked on the address connected to) unless the operator allowed a network."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
from aiohttp.abc import ResolveResult

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


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: Sequence[str]) -> list[Network]:
    """The operator's `--webhook-allow` networks; a malformed one is a ValueError naming it."""
    out = []
    for cidr in cidrs:
        try:
            out.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            raise ValueError(f"--webhook-allow {cidr!r} is not a network; give one like 10.1.0.0/16 or 127.0.0.1/32.") from None
    return out


def refused_reason(host: str, allow: Sequence[Network]) -> str | None:
    """Why a webhook may not connect to this address (loopback, private, link-local and cloud metadata,
    multicast, unspecified, reserved: anything not public), or None when it may."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in net for net in allow):
        return None
    if ip.is_global and not ip.is_multicast:
        return None
    return (
        f"the webhook address {ip} is not public (loopback, private, link-local, metadata or multicast); "
        "an operator can allow its network with `backfill serve --webhook-allow CIDR`"
    )


class AddressRefused(aiohttp.ClientConnectionError):
    """A webhook host resolved only to addresses that deliveries may not reach."""


class GuardedConnector(aiohttp.TCPConnector):
    """Connects only to addresses that pass the policy. The check runs on the addresses this connection
    resolves and then uses (no DNS cache), so a name that later resolves elsewhere cannot get around it."""

    def __init__(self, allow: Sequence[Network], **kwargs: Any):
        super().__init__(use_dns_cache=False, **kwargs)
        self._allow = list(allow)

    async def _resolve_host(self, host: str, port: int, traces: Any = None) -> list[ResolveResult]:
        results = await super()._resolve_host(host, port, traces)
        allowed = [r for r in results if refused_reason(r["host"], self._allow) is None]
        if not allowed:
            raise AddressRefused(refused_reason(results[0]["host"], self._allow) if results else f"{host} has no address")
        return allowed


class Webhooks:
    """Sends due deliveries, each in its own task with its own timeout; `notify` queues one and wakes the sender."""

    def __init__(
        self, db: ServerDB, *, backoff_s: float = 2.0, max_attempts: int = 8, timeout_s: float = 10.0, allow: Sequence[str] = ()
    ):
        self.db = db
        self.backoff_s = backoff_s
        self.max_attempts = max_attempts
        self.timeout_s = timeout_s
        self.allow = parse_networks(allow)
        self._wake = asyncio.Event()
        self._sending: dict[int, asyncio.Task[None]] = {}

    def notify(self, job_id: str, owner: str, url: str, event: str, payload: dict[str, object]) -> None:
        self.db.add_delivery(job_id, owner, url, event, json.dumps(payload, sort_keys=True))
        self._wake.set()

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        connector = GuardedConnector(self.allow)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector, trust_env=False) as session:
            try:
                await self._loop(session)
            finally:
                for task in self._sending.values():
                    task.cancel()
                await asyncio.gather(*self._sending.values(), return_exceptions=True)

    async def _loop(self, session: aiohttp.ClientSession) -> None:
        while True:
            now = time.time()
            self._wake.clear()
            for d in self.db.due_deliveries(now):
                if d.id in self._sending:
                    continue
                # Held until its answer or timeout: a restart meanwhile sends it again once the hold ends.
                self.db.delivery_hold(d.id, now + self.timeout_s + 5)
                task = asyncio.create_task(self._send(session, d))
                self._sending[d.id] = task
                task.add_done_callback(lambda _, i=d.id: self._sent(i))
            nxt = self.db.next_delivery_at()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=None if nxt is None else max(0.0, nxt - now))
            except TimeoutError:
                pass

    def _sent(self, delivery_id: int) -> None:
        self._sending.pop(delivery_id, None)
        self._wake.set()

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
            # No redirects: a redirect's target would be one more address to check.
            async with session.post(d.url, data=body, headers=headers, allow_redirects=False) as resp:
                if 200 <= resp.status < 300:
                    self.db.delivery_done(d.id, attempts, None)
                    log.info("webhook delivered", extra={**extra, "status": resp.status})
                    return
                error = f"HTTP {resp.status}"
        except AddressRefused as e:
            self.db.delivery_done(d.id, attempts, f"refused: {e}")
            log.warning("webhook refused: %s", e, extra=extra)
            return
        except TimeoutError:
            error = f"no answer within {self.timeout_s:g} s"
        except (aiohttp.ClientError, ValueError) as e:
            error = f"{type(e).__name__}: {e}"
        if attempts >= self.max_attempts:
            self.db.delivery_done(d.id, attempts, error)
            log.warning("webhook given up after %d attempts: %s", attempts, error, extra=extra)
            return
        delay = self.backoff_s * 2 ** (attempts - 1)
        self.db.delivery_retry(d.id, attempts, time.time() + delay, error)
        log.info("webhook failed (%s); retry in %.1f s", error, delay, extra=extra)
