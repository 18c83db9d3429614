"""The job queue and its workers (asyncio tasks in the server process): quotas, fair sharing of lanes,
pause / resume / cancel, spend accounting, restart recovery, and the live series the dashboard draws.

Fair share: one `FairShare` per lane over one `Limiter`. Each running job is a share named by its id,
weighted `user weight × job priority ÷ (sum of that user's job priorities on the lane)`: between users
the lane splits by the operator's weights (equal by default), and within one user by priority.
A lane's limits come from the operator or the provider's headers; a job's own spec limits are an
`OwnLimit` in front of its share, so they slow that job only, and nothing of a job stays on the lane.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from backfill.engine import run_job
from backfill.engine.fairshare import FairShare, OwnLimit
from backfill.engine.runner import JobRunner, RunResult
from backfill.errors import BackfillError, BudgetExceeded
from backfill.limits import LaneLimiter, LaneLimits, Limiter
from backfill.server.caps import Caps, Settings, fair_jobs_per_user
from backfill.server.db import Credential, ServerDB, ServerJob, User
from backfill.server.inputs import expire_uploads
from backfill.server.logs import log
from backfill.server.metrics import LaneCounters, MeteredLimiter, Metrics
from backfill.server.webhooks import Webhooks
from backfill.spec import build_spec
from backfill.status import JobStatus, StopCause
from backfill.store import Store

SERIES_EVERY_S = 1.0
SERIES_POINTS = 1800  # 30 minutes at one point a second
KEEP_FINISHED_SERIES = 200


@dataclass(slots=True)
class JobPoint:
    t: float
    rows_done: int
    requests: int
    tokens: int
    cost_usd: float
    tpm_limit: float | None
    rpm_limit: float | None


@dataclass(slots=True)
class LanePoint:
    t: float
    requests_per_min: float
    rate_limited_per_min: float
    rpm_limit: float | None
    in_flight: int


@dataclass(eq=False)
class Lane:
    """A lane in use: its limiter, the fair share in front of it, and who is on it."""

    key: str
    lane_id: str
    base: LaneLimits  # none of a job's limits: learned from headers; the operator's settings override it
    limiter: Limiter
    fair: FairShare
    counters: LaneCounters = field(default_factory=LaneCounters)
    members: dict[str, tuple[str, float]] = field(default_factory=dict)  # job id -> (owner, priority)
    series: deque[LanePoint] = field(default_factory=lambda: deque(maxlen=SERIES_POINTS))
    last: tuple[float, int, int] = (0.0, 0, 0)


@dataclass(eq=False)
class RunningJob:
    job: ServerJob
    task: asyncio.Task[None] | None = None
    runner: JobRunner | None = None
    lane: Lane | None = None
    stop_as: str | None = None  # why the server stopped it: pause, cancel, quota, shutdown
    stop_reason: str | None = None
    last_cost: float = 0.0
    last_in: int = 0
    last_out: int = 0
    last_ok: int = 0
    last_failed: int = 0
    series: deque[JobPoint] = field(default_factory=lambda: deque(maxlen=SERIES_POINTS))

    def attach(self, runner: JobRunner) -> None:
        self.runner = runner
        if self.stop_as is not None:
            self._stop_runner()

    def stop(self, why: str, reason: str) -> None:
        if self.stop_as == "cancel":
            return
        self.stop_as, self.stop_reason = why, reason
        if self.runner is not None:
            self._stop_runner()

    def _stop_runner(self) -> None:
        assert self.runner is not None
        if self.stop_as == "cancel":
            self.runner.stop(JobStatus.CANCELLED, self.stop_reason or "cancelled", cause=StopCause.CANCEL, hard=True)
        else:
            cause = {"quota": StopCause.QUOTA, "shutdown": StopCause.SHUTDOWN}.get(self.stop_as or "", StopCause.PAUSE)
            self.runner.stop(JobStatus.PAUSED, self.stop_reason or "paused", cause=cause)


def cache_scope(owner: str, cred: Credential | None) -> str:
    """Whose answers a job may reuse: its owner's on the same credential, or the team's where the operator shared
    that credential's cache. One user never gets another's answer, nor learns from a hit what another sent."""
    if cred is None:
        return f"owner:{owner}"
    if cred.cache_shared:
        return f"credential:{cred.name}"
    return f"credential:{cred.name}|owner:{owner}"


def cache_shared(scope: str) -> bool:
    """Whether a scope from `cache_scope` is a credential's team-wide cache."""
    return scope.startswith("credential:") and "|owner:" not in scope


def operator_prices(settings: Settings, cred: Credential | None) -> dict[str, Any]:
    """The table the server bills by: the server-wide prices, then the credential's own."""
    prices = {m: p.model_dump() for m, p in settings.prices.items()}
    return {**prices, **(cred.prices if cred is not None else {})}


def lane_key(lane_id: str) -> str:
    return hashlib.sha256(lane_id.encode()).hexdigest()[:10]


def lane_name(lane_id: str) -> str:
    """`provider|base url|key fingerprint|model` shown as `model @ base url (key fingerprint)`."""
    parts = lane_id.split("|")
    if len(parts) >= 4:
        return f"{parts[-1]} @ {parts[1]} (key {parts[2]})"
    return lane_id


class Scheduler:
    def __init__(
        self,
        db: ServerDB,
        data_dir: Path,
        metrics: Metrics,
        webhooks: Webhooks,
        *,
        max_running: int = 16,
        tick_s: float = 0.5,
        shutdown_grace_s: float = 15.0,
        sweep_every_s: float = 60.0,
    ):
        self.db = db
        self.data_dir = data_dir
        self.store = Store(data_dir / "backfill.db")
        self.metrics = metrics
        self.webhooks = webhooks
        self.max_running = max_running
        self.tick_s = tick_s
        self.shutdown_grace_s = shutdown_grace_s
        self.running: dict[str, RunningJob] = {}
        self.lanes: dict[str, Lane] = {}  # by key
        self._finished_series: OrderedDict[str, deque[JobPoint]] = OrderedDict()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_series = 0.0
        self.sweep_every_s = sweep_every_s
        self._last_sweep = 0.0
        self._closing = False
        self._settings: Settings | None = None  # read once per change: quotas are checked for every queued job each tick

    # --- life -----------------------------------------------------------------

    def start(self) -> None:
        requeued = self.db.requeue_interrupted()
        for job_id in requeued:
            log.info("job re-queued after a restart", extra={"job_id": job_id})
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        """Stop every running job gracefully (answers in flight are kept) and put it back in the queue."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for rj in self.running.values():
            rj.stop("shutdown", "server stopping")
        tasks = [rj.task for rj in self.running.values() if rj.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.shutdown_grace_s)
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for lane in self.lanes.values():
            await lane.fair.close()
        self.store.close()

    def stop_dispatch(self) -> None:
        """On SIGTERM, before the HTTP server drains: start no job and send nothing more; `close` then waits
        for the answers in flight."""
        self._closing = True
        for rj in self.running.values():
            rj.stop("shutdown", "server stopping")

    def wake(self) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.tick_s)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                self._account()
                if not self._closing:
                    self._schedule()
                self._sweep_uploads()
            except Exception:  # one bad tick must not stop the scheduler
                log.exception("scheduler tick failed")

    # --- starting jobs ----------------------------------------------------------

    def _schedule(self) -> None:
        per_user = Counter(rj.job.owner for rj in self.running.values())
        users: dict[str, User | None] = {}
        for job in self.db.queued_jobs():
            if job.owner not in users:
                users[job.owner] = self.db.get_user(job.owner)
            user = users[job.owner]
            if user is None:
                self.db.set_job_status(job.id, "cancelled", "its owner was removed")
                continue
            reason = self.quota_block(user, per_user[user.name])
            if reason is None and len(self.running) >= self.max_running:
                reason = f"waiting: the server runs at most {self.max_running} jobs at once"
            if reason is not None:
                self.db.set_job_reason(job.id, reason)
                continue
            per_user[user.name] += 1
            self._start(job)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = self.db.get_settings()
        return self._settings

    def put_settings(self, settings: Settings) -> None:
        self.db.put_settings(settings)
        self._settings = None
        self.wake()

    def caps_for(self, user: User) -> Caps:
        """The caps a user's jobs are held to: the server's, with the user's own where the operator set them."""
        return self.settings.over(user.caps)

    def max_jobs_for(self, user: User) -> int:
        if user.max_jobs is not None:
            return user.max_jobs
        return self.settings.max_jobs_per_user or fair_jobs_per_user(self.max_running)

    def quota_block(self, user: User, running: int) -> str | None:
        """Why `user` may not start another job now, or None."""
        max_jobs = self.max_jobs_for(user)
        if running >= max_jobs:
            return f"waiting for quota: {user.name} may run {max_jobs} job(s) at once"
        day, month = self.db.spend(user.name)
        if user.usd_per_day is not None and day >= user.usd_per_day:
            return f"waiting for quota: today's spend ${day:.2f} reached the daily ${user.usd_per_day:.2f}; resumes at 00:00 UTC"
        if user.usd_per_month is not None and month >= user.usd_per_month:
            return f"waiting for quota: this month's spend ${month:.2f} reached the monthly ${user.usd_per_month:.2f}; resumes on the 1st (UTC)"
        return None

    def _start(self, job: ServerJob) -> None:
        self.db.set_job_status(job.id, "running")
        rj = RunningJob(job)
        self.running[job.id] = rj
        rj.task = asyncio.create_task(self._run(rj))
        log.info("job started", extra={"job_id": job.id, "user": job.owner})

    async def _run(self, rj: RunningJob) -> None:
        job = rj.job
        record = self.store.get_job(job.id)
        if record is not None:
            rj.last_cost, rj.last_ok, rj.last_failed = record.spent_usd, record.rows_ok, record.rows_failed
        event: str | None = None
        cause: StopCause | None = None
        try:
            cred = self._credential(job)
            # Billed by the operator's prices as they are now, never by any the job brought.
            spec = build_spec({**job.spec, "prices": operator_prices(self.settings, cred)})
            result: RunResult = await run_job(
                spec,
                state_dir=self.data_dir,
                on_start=rj.attach,
                api_key=cred.api_key if cred is not None else None,
                limiter_for=lambda lane_id, limits: self._limiter_for(rj, lane_id, limits),
                cache_scope=job.cache_scope or cache_scope(job.owner, cred),
            )
            status, reason, cause = result.status, result.reason, result.cause
        except BudgetExceeded as e:
            status, reason, event = "failed", str(e), "budget_stopped"
        except BackfillError as e:
            status, reason = "failed", str(e)
        except asyncio.CancelledError:
            status, reason = "paused", "stopped"
        except Exception as e:
            log.exception("job crashed", extra={"job_id": job.id, "user": job.owner})
            status, reason = "failed", f"internal error ({type(e).__name__}); the server log has the details"
        finally:
            self._account_job(rj, time.time(), force_point=True)
            self.metrics.forget_job(rj.lane.key if rj.lane else "-", job.owner, job.id)
            self._leave_lane(rj)
            self.running.pop(job.id, None)
            self._finished_series[job.id] = rj.series
            while len(self._finished_series) > KEEP_FINISHED_SERIES:
                self._finished_series.popitem(last=False)
        self._settle(rj, status, reason, event, cause)
        self.wake()

    def _settle(self, rj: RunningJob, status: str, reason: str | None, event: str | None, cause: StopCause | None = None) -> None:
        """Record how a run ended in the server's terms, and notify."""
        job = rj.job
        if status == "paused":
            if rj.stop_as == "shutdown":
                status, reason = "queued", "resumes when the server restarts"
            elif rj.stop_as == "quota":
                status, reason = "queued", rj.stop_reason
            elif cause is StopCause.BUDGET:
                event = "budget_stopped"
        if status in ("succeeded", "failed", "cancelled") and event is None:
            event = status
        self.db.set_job_status(job.id, status, reason)
        log.info("job %s", status, extra={"job_id": job.id, "user": job.owner, "status": status})
        if event is not None:
            self.notify(job, event, status, reason)

    def notify(self, job: ServerJob, event: str, status: str, reason: str | None) -> None:
        user = self.db.get_user(job.owner)
        url = job.webhook_url or (user.webhook_url if user else None)
        if not url:
            return
        rec = self.store.get_job(job.id)
        payload: dict[str, Any] = {
            "event": f"job.{event}",
            "job_id": job.id,
            "owner": job.owner,
            "status": status,
            "reason": reason,
            "rows_total": job.rows_total,
            "rows_ok": rec.rows_ok if rec else 0,
            "rows_failed": rec.rows_failed if rec else 0,
            "spent_usd": rec.spent_usd if rec else 0.0,
            "at": time.time(),
        }
        self.webhooks.notify(job.id, job.owner, url, payload["event"], payload)

    def _credential(self, job: ServerJob) -> Credential | None:
        if job.credential is None:
            return None
        cred = self.db.get_credential(job.credential)
        if cred is None or not self.db.may_use(cred.name, job.owner):
            raise BackfillError(f"The credential {job.credential} was removed or revoked; ask an operator to grant it, then resume the job.")
        return cred

    # --- lanes and fair share ------------------------------------------------------

    def _limiter_for(self, rj: RunningJob, lane_id: str, limits: LaneLimits) -> LaneLimiter:
        key = lane_key(lane_id)
        lane = self.lanes.get(key)
        if lane is None:
            row = self.db.ensure_lane(key, lane_name(lane_id))
            base = LaneLimits(refund_output=limits.refund_output)
            limiter = Limiter(self._effective(base, row.rpm, row.tpm, row.max_in_flight))
            lane = self.lanes[key] = Lane(key, lane_id, base, limiter, FairShare(limiter))
        rj.lane = lane
        lane.members[rj.job.id] = (rj.job.owner, rj.job.priority)
        view = OwnLimit(Limiter(limits, learn=False), lane.fair.for_job(rj.job.id))
        self._reweight(lane, rj.job.owner)
        return MeteredLimiter(view, lane.counters, self.metrics, key, rj.job.owner, rj.job.id)

    @staticmethod
    def _effective(base: LaneLimits, rpm: float | None, tpm: float | None, max_in_flight: int | None) -> LaneLimits:
        return replace(
            base,
            rpm=rpm if rpm is not None else base.rpm,
            tpm=tpm if tpm is not None else base.tpm,
            max_in_flight=max_in_flight if max_in_flight is not None else base.max_in_flight,
        )

    def set_lane_limits(self, key: str, rpm: float | None, tpm: float | None, max_in_flight: int | None) -> None:
        """The operator's limits for a lane (None: what the provider's headers say); applied at once to a lane in use."""
        self.db.set_lane_limits(key, rpm, tpm, max_in_flight)
        lane = self.lanes.get(key)
        if lane is not None:
            lane.limiter.set_limits(self._effective(lane.base, rpm, tpm, max_in_flight))

    def _reweight(self, lane: Lane, owner: str) -> None:
        user = self.db.get_user(owner)
        weight = user.weight if user else 1.0
        mine = {job_id: prio for job_id, (o, prio) in lane.members.items() if o == owner}
        total = sum(mine.values())
        for job_id, prio in mine.items():
            lane.fair.set_weight(job_id, weight * prio / total)

    def reweight_user(self, owner: str) -> None:
        for lane in self.lanes.values():
            if any(o == owner for o, _ in lane.members.values()):
                self._reweight(lane, owner)

    def _leave_lane(self, rj: RunningJob) -> None:
        lane = rj.lane
        if lane is not None:
            lane.fair.leave(rj.job.id)
        if lane is not None and lane.members.pop(rj.job.id, None) is not None:
            self._reweight(lane, rj.job.owner)

    # --- control ----------------------------------------------------------------------

    def pause(self, job: ServerJob, by: str) -> None:
        rj = self.running.get(job.id)
        if rj is not None:
            rj.stop("pause", f"paused by {by}")
        else:
            self.db.set_job_status(job.id, "paused", f"paused by {by}")

    def resume(self, job: ServerJob) -> None:
        self.db.set_job_status(job.id, "queued", None)
        self.wake()

    def cancel(self, job: ServerJob, by: str) -> None:
        rj = self.running.get(job.id)
        if rj is not None:
            rj.stop("cancel", f"cancelled by {by}")
            return
        self.db.set_job_status(job.id, "cancelled", f"cancelled by {by}")
        self.notify(job, "cancelled", "cancelled", f"cancelled by {by}")

    def series(self, job_id: str) -> list[JobPoint]:
        rj = self.running.get(job_id)
        points = rj.series if rj is not None else self._finished_series.get(job_id, ())
        return list(points)

    # --- accounting: spend, metrics, series, quotas -------------------------------------

    def _account(self) -> None:
        now = time.time()
        point = now - self._last_series >= SERIES_EVERY_S
        if point:
            self._last_series = now
        for rj in list(self.running.values()):
            self._account_job(rj, now, point)
        self._enforce_spend_quotas()
        if point:
            self._sample_lanes(now)
        counts = self.db.count_by_status()
        self.metrics.queue_depth.set(counts.get("queued", 0))
        for status in ("queued", "running", "paused", "succeeded", "failed", "cancelled"):
            self.metrics.jobs.labels(status).set(counts.get(status, 0))

    def _account_job(self, rj: RunningJob, now: float, force_point: bool) -> None:
        runner = rj.runner
        if runner is None:
            return
        s, job = runner.stats, rj.job
        key = rj.lane.key if rj.lane else "-"
        m, labels = self.metrics, (key, job.owner, job.id)
        if s.cost_usd > rj.last_cost:  # the runner starts at 0 and then loads what was spent before
            delta = s.cost_usd - rj.last_cost
            self.db.add_spend(job.owner, delta)
            m.cost.labels(*labels).inc(delta)
            m.user_cost.labels(key, job.owner).inc(delta)
            rj.last_cost = s.cost_usd
        if s.input_tokens > rj.last_in:
            m.tokens.labels(*labels, "input").inc(s.input_tokens - rj.last_in)
            rj.last_in = s.input_tokens
        if s.output_tokens > rj.last_out:
            m.tokens.labels(*labels, "output").inc(s.output_tokens - rj.last_out)
            rj.last_out = s.output_tokens
        if s.rows_ok > rj.last_ok:
            m.rows.labels(*labels, "ok").inc(s.rows_ok - rj.last_ok)
            rj.last_ok = s.rows_ok
        if s.rows_failed > rj.last_failed:
            m.rows.labels(*labels, "dead_letter").inc(s.rows_failed - rj.last_failed)
            rj.last_failed = s.rows_failed
        if force_point:
            rj.series.append(
                JobPoint(now, s.rows_done, s.requests_sent, s.input_tokens + s.output_tokens, s.cost_usd, s.tpm_limit, s.rpm_limit)
            )

    def _enforce_spend_quotas(self) -> None:
        owners = {rj.job.owner for rj in self.running.values() if rj.stop_as is None}
        for owner in owners:
            user = self.db.get_user(owner)
            if user is None or (user.usd_per_day is None and user.usd_per_month is None):
                continue
            reason = self.quota_block(replace(user, max_jobs=None), 0)
            if reason is not None:
                for rj in self.running.values():
                    if rj.job.owner == owner and rj.stop_as is None:
                        rj.stop("quota", reason)

    def _sweep_uploads(self) -> None:
        now = time.time()
        if now - self._last_sweep < self.sweep_every_s:
            return
        self._last_sweep = now
        retention: dict[str, float | None] = {}

        def days(owner: str) -> float | None:
            if owner not in retention:
                user = self.db.get_user(owner)
                retention[owner] = self.caps_for(user).upload_retention_days if user else self.settings.upload_retention_days
            return retention[owner]

        removed = expire_uploads(self.db, now, days)
        if removed:
            log.info("uploads expired", extra={"event": f"{removed} upload(s) past their retention deleted"})

    def _sample_lanes(self, now: float) -> None:
        for lane in self.lanes.values():
            t0, a0, r0 = lane.last
            c = lane.counters
            st = lane.limiter.stats()
            if t0:
                dt = max(now - t0, 1e-6)
                lane.series.append(LanePoint(now, (c.admitted - a0) / dt * 60, (c.rate_limited - r0) / dt * 60, st.rpm, st.in_flight))
            lane.last = (now, c.admitted, c.rate_limited)
            self.metrics.lane_in_flight.labels(lane.key).set(st.in_flight)
            if st.rpm is not None:
                self.metrics.lane_rpm.labels(lane.key).set(st.rpm)
