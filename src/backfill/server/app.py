"""The HTTP API (FastAPI; OpenAPI at /docs) and the dashboard's static files, over the scheduler.

A user sees and acts on their own jobs only (another's is a 404); operators see and act on all,
manage users, credentials and lanes. Provider keys go in through POST /credentials and never come out.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from backfill.engine import make_plan
from backfill.errors import BackfillError
from backfill.server import auth
from backfill.server.auth import current_user, operator
from backfill.server.db import TERMINAL, ServerDB, ServerJob, User
from backfill.server.inputs import resolve_allowed, save_upload
from backfill.server.logs import log
from backfill.server.metrics import Metrics
from backfill.server.scheduler import Scheduler
from backfill.server.webhooks import Webhooks
from backfill.spec import build_spec

STATIC = Path(__file__).parent / "static"
URL_PATTERN = r"^https?://[^\s]+$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
OUTPUT_EXT = {"parquet": "parquet", "csv": "csv", "jsonl": "jsonl"}


@dataclass
class ServerConfig:
    data_dir: Path
    allow_dirs: list[Path] = field(default_factory=list)
    max_running: int = 16
    tick_s: float = 0.5
    webhook_backoff_s: float = 2.0
    webhook_max_attempts: int = 8
    shutdown_grace_s: float = 15.0
    sse_every_s: float = 1.0


# --- API models ----------------------------------------------------------------------


class MeView(BaseModel):
    name: str
    role: str
    weight: float
    max_jobs: int | None
    usd_per_day: float | None
    usd_per_month: float | None
    spent_today_usd: float
    spent_month_usd: float
    webhook_url: str | None
    webhook_secret: str = Field(description="Verifies the X-Backfill-Signature of your webhooks.")


class WebhookIn(BaseModel):
    url: str | None = Field(None, pattern=URL_PATTERN, max_length=2000)


class UploadView(BaseModel):
    upload_id: str
    filename: str
    size: int


class SubmitJob(BaseModel):
    spec: dict[str, Any] = Field(description="A JobSpec as JSON (the same as a job file); output.path is chosen by the server.")
    credential: str | None = Field(None, description="Name of a provider credential; none: the built-in simulator.", max_length=64)
    upload_id: str | None = Field(None, description="An upload to read instead of spec.input.path.", max_length=64)
    priority: float = Field(1.0, gt=0, le=1000, description="Share among your own jobs on a lane (relative).")
    webhook_url: str | None = Field(None, pattern=URL_PATTERN, max_length=2000)


class JobView(BaseModel):
    id: str
    owner: str
    status: str
    reason: str | None
    model: str
    credential: str | None
    priority: float
    lane: str | None
    created: float
    updated: float
    rows_total: int
    rows_ok: int
    rows_failed: int
    requests_sent: int
    rate_limited: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    projected_cost_usd: float | None
    requests_per_s: float
    tokens_per_min: float
    tpm_limit: float | None
    rpm_limit: float | None
    in_flight: int
    eta_s: float | None


class SeriesPoint(BaseModel):
    t: float
    rows_done: int
    requests: int
    tokens: int
    cost_usd: float
    tpm_limit: float | None
    rpm_limit: float | None


class JobProgress(JobView):
    series: list[SeriesPoint]


class DeadLetterView(BaseModel):
    row_id: str
    chunk_index: int
    reason: str
    raw: str | None


class UserIn(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)
    role: Literal["user", "operator"] = "user"


class UserCreated(BaseModel):
    name: str
    role: str
    token: str = Field(description="Shown once; only its hash is stored.")


class UserPatch(BaseModel):
    weight: float | None = Field(None, gt=0, le=1000)
    max_jobs: int | None = Field(None, ge=0, le=10000)
    usd_per_day: float | None = Field(None, ge=0)
    usd_per_month: float | None = Field(None, ge=0)
    webhook_url: str | None = Field(None, pattern=URL_PATTERN, max_length=2000)


class UserView(BaseModel):
    name: str
    role: str
    weight: float
    max_jobs: int | None
    usd_per_day: float | None
    usd_per_month: float | None
    spent_today_usd: float
    spent_month_usd: float
    running: int
    queued: int


class CredentialIn(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)
    provider: Literal["sim", "openai", "azure", "anthropic"]
    base_url: str | None = Field(None, pattern=URL_PATTERN, max_length=2000)
    api_key: str | None = Field(None, max_length=4000)


class CredentialView(BaseModel):
    name: str
    provider: str
    base_url: str | None


class LanePointView(BaseModel):
    t: float
    requests_per_min: float
    rate_limited_per_min: float
    rpm_limit: float | None
    in_flight: int


class LaneView(BaseModel):
    key: str
    name: str
    active: bool
    rpm: float | None = Field(description="Requests/min in force.")
    tpm: float | None
    max_in_flight: int | None
    override_rpm: float | None
    override_tpm: float | None
    override_max_in_flight: int | None
    in_flight: int
    waiting: int
    pace: float
    rate_limited_total: int
    requests_total: int
    utilisation: float | None = Field(description="Requests/min over the last points ÷ the rpm in force.")
    jobs: list[str]
    series: list[LanePointView]


class LaneLimitsIn(BaseModel):
    rpm: float | None = Field(None, gt=0, le=1e9)
    tpm: float | None = Field(None, gt=0, le=1e12)
    max_in_flight: int | None = Field(None, ge=1, le=100000)


class Overview(BaseModel):
    queue_depth: int
    jobs_by_status: dict[str, int]
    users: list[UserView]
    lanes: list[LaneView]


class Done(BaseModel):
    id: str
    status: str


# --- the app -------------------------------------------------------------------------------


def create_app(config: ServerConfig) -> FastAPI:
    """The server: API, dashboard, metrics, and the scheduler and webhook sender running inside it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        db = ServerDB(config.data_dir / "server.db")
        metrics = Metrics()
        webhooks = Webhooks(db, backoff_s=config.webhook_backoff_s, max_attempts=config.webhook_max_attempts)
        sched = Scheduler(db, config.data_dir, metrics, webhooks, max_running=config.max_running, tick_s=config.tick_s, shutdown_grace_s=config.shutdown_grace_s)
        app.state.db, app.state.metrics, app.state.sched = db, metrics, sched
        app.state.closing = asyncio.Event()
        sched.start()
        sender = asyncio.create_task(webhooks.run())
        log.info("server started", extra={"event": "start"})
        try:
            yield
        finally:
            app.state.closing.set()
            await sched.close()
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            db.close()
            log.info("server stopped", extra={"event": "stop"})

    app = FastAPI(
        title="backfill",
        summary="Push large tables through LLMs under shared rate limits.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.config = config

    @app.exception_handler(BackfillError)
    async def _backfill_error(request: Request, exc: BackfillError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    _routes(app, config)
    return app


def _sched(request: Request) -> Scheduler:
    return request.app.state.sched


def _db(request: Request) -> ServerDB:
    return request.app.state.db


def _visible_job(request: Request, user: User, job_id: str) -> ServerJob:
    job = _db(request).get_job(job_id)
    if job is None or (not user.is_operator and job.owner != user.name):
        raise HTTPException(404, f"There is no job {job_id} that you can see.")
    return job


def job_view(sched: Scheduler, job: ServerJob) -> JobView:
    rec = sched.store.get_job(job.id)
    rj = sched.running.get(job.id)
    stats = rj.runner.stats if rj is not None and rj.runner is not None else None
    rows_ok = max(stats.rows_ok if stats else 0, rec.rows_ok if rec else 0)
    rows_failed = max(stats.rows_failed if stats else 0, rec.rows_failed if rec else 0)
    cost = max(stats.cost_usd if stats else 0.0, rec.spent_usd if rec else 0.0)
    rps, tpm = stats.rates() if stats else (0.0, 0.0)
    done = rows_ok + rows_failed
    return JobView(
        id=job.id,
        owner=job.owner,
        status=job.status,
        reason=(rj.stop_reason if rj is not None and rj.stop_as else None) or job.reason,
        model=str(job.spec.get("task", {}).get("model", "")),
        credential=job.credential,
        priority=job.priority,
        lane=rj.lane.key if rj is not None and rj.lane is not None else None,
        created=job.created,
        updated=job.updated,
        rows_total=job.rows_total,
        rows_ok=rows_ok,
        rows_failed=rows_failed,
        # A live run's own totals: the ledger adds this run's counts when it ends, before it leaves `running`.
        requests_sent=stats.requests_before + stats.requests_sent if stats else (rec.requests if rec else 0),
        rate_limited=stats.rate_limited_before + stats.rate_limited if stats else (rec.rate_limited if rec else 0),
        input_tokens=max(stats.input_tokens if stats else 0, rec.input_tokens if rec else 0),
        output_tokens=max(stats.output_tokens if stats else 0, rec.output_tokens if rec else 0),
        cost_usd=cost,
        projected_cost_usd=cost / done * job.rows_total if done else None,
        requests_per_s=rps,
        tokens_per_min=tpm,
        tpm_limit=stats.tpm_limit if stats else None,
        rpm_limit=stats.rpm_limit if stats else None,
        in_flight=stats.in_flight if stats else 0,
        eta_s=stats.eta_s() if stats else None,
    )


def _user_view(db: ServerDB, sched: Scheduler, u: User) -> UserView:
    day, month = db.spend(u.name)
    return UserView(
        name=u.name, role=u.role, weight=u.weight, max_jobs=u.max_jobs, usd_per_day=u.usd_per_day, usd_per_month=u.usd_per_month,
        spent_today_usd=day, spent_month_usd=month,
        running=sum(1 for rj in sched.running.values() if rj.job.owner == u.name),
        queued=len(db.list_jobs(owner=u.name, status="queued", limit=10000)),
    )


def _lane_views(db: ServerDB, sched: Scheduler) -> list[LaneView]:
    out = []
    for row in db.list_lanes():
        lane = sched.lanes.get(row.id)
        if lane is None and row.rpm is None and row.tpm is None and row.max_in_flight is None:
            continue  # not used since the server started and nothing set on it: e.g. a past job's own simulator
        st = lane.limiter.stats() if lane is not None else None
        series = list(lane.series) if lane is not None else []
        recent = series[-10:]
        used = sum(p.requests_per_min for p in recent) / len(recent) if recent else None
        rpm = st.rpm if st else row.rpm
        out.append(
            LaneView(
                key=row.id, name=row.name, active=bool(lane and lane.members),
                rpm=rpm, tpm=st.tpm if st else row.tpm, max_in_flight=st.max_in_flight if st else row.max_in_flight,
                override_rpm=row.rpm, override_tpm=row.tpm, override_max_in_flight=row.max_in_flight,
                in_flight=st.in_flight if st else 0, waiting=st.waiting if st else 0, pace=st.pace if st else 1.0,
                rate_limited_total=lane.counters.rate_limited if lane else 0,
                requests_total=lane.counters.admitted if lane else 0,
                utilisation=(used / rpm) if used is not None and rpm else None,
                jobs=sorted(lane.members) if lane else [],
                series=[LanePointView(t=p.t, requests_per_min=p.requests_per_min, rate_limited_per_min=p.rate_limited_per_min, rpm_limit=p.rpm_limit, in_flight=p.in_flight) for p in series[-600:]],
            )
        )
    return out


def _routes(app: FastAPI, config: ServerConfig) -> None:
    # --- me ---------------------------------------------------------------------------

    @app.get("/me", response_model=MeView, tags=["me"])
    async def me(request: Request, user: User = Depends(current_user)) -> MeView:
        day, month = _db(request).spend(user.name)
        return MeView(
            name=user.name, role=user.role, weight=user.weight, max_jobs=user.max_jobs, usd_per_day=user.usd_per_day,
            usd_per_month=user.usd_per_month, spent_today_usd=day, spent_month_usd=month, webhook_url=user.webhook_url,
            webhook_secret=user.webhook_secret,
        )

    @app.put("/me/webhook", response_model=MeView, tags=["me"])
    async def set_my_webhook(body: WebhookIn, request: Request, user: User = Depends(current_user)) -> MeView:
        """Your default webhook, called for every job of yours that has none of its own."""
        _db(request).update_user(user.name, webhook_url=body.url)
        refreshed = _db(request).get_user(user.name)
        assert refreshed is not None
        return await me(request, refreshed)

    @app.get("/credentials", response_model=list[CredentialView], tags=["credentials"])
    async def list_credentials(request: Request, user: User = Depends(current_user)) -> list[CredentialView]:
        """The credentials a job can name (never their keys)."""
        return [CredentialView(name=c.name, provider=c.provider, base_url=c.base_url) for c in _db(request).list_credentials()]

    # --- input --------------------------------------------------------------------------

    @app.post(
        "/uploads", response_model=UploadView, status_code=201, tags=["jobs"],
        openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
    )
    async def upload(request: Request, filename: str = Query("input", max_length=200), user: User = Depends(current_user)) -> UploadView:
        """Stream an input file (the raw request body) to the server; name it with `filename` so its extension tells the format."""
        up = await save_upload(_db(request), config.data_dir, user.name, filename, request.stream())
        log.info("upload stored", extra={"user": user.name})
        return UploadView(upload_id=up.id, filename=up.filename, size=up.size)

    # --- jobs -------------------------------------------------------------------------------

    @app.post("/jobs", response_model=JobView, status_code=201, tags=["jobs"])
    async def submit(body: SubmitJob, request: Request, user: User = Depends(current_user)) -> JobView:
        """Submit a job: checked at once (columns, template, schema, model) before it is queued."""
        db, sched = _db(request), _sched(request)
        data = build_spec(body.spec).model_dump(by_alias=True)
        if body.upload_id is not None:
            up = db.get_upload(body.upload_id)
            if up is None or up.owner != user.name:
                raise HTTPException(404, f"There is no upload {body.upload_id} of yours.")
            data["input"]["path"] = up.path
        elif data["input"].get("path"):
            data["input"]["path"] = resolve_allowed(data["input"]["path"], config.allow_dirs)
        else:
            raise HTTPException(400, "Give the input: upload it (POST /uploads) and pass upload_id, or set spec.input.path.")
        api_key = None
        task = data["task"]
        if body.credential is not None:
            cred = db.get_credential(body.credential)
            if cred is None:
                raise HTTPException(400, f"There is no credential {body.credential}; GET /credentials lists them.")
            task["provider"], task["base_url"], api_key = cred.provider, cred.base_url, cred.api_key
        elif task["provider"] != "sim" or task.get("base_url"):
            raise HTTPException(400, "Name a credential for this provider; GET /credentials lists them.")
        task["api_key_env"] = None  # keys come from credentials only, never from the server's environment
        out_dir = config.data_dir / "outputs" / uuid.uuid4().hex
        out_dir.mkdir(parents=True)
        ext = OUTPUT_EXT.get(data["output"].get("format") or "parquet", "parquet")
        data["output"]["path"] = str(out_dir / f"result.{ext}")
        data["owner"] = user.name
        spec = build_spec(data)
        try:
            plan = await asyncio.to_thread(make_plan, spec, api_key=api_key)
        except (OSError, ValueError, pa.ArrowException) as e:
            raise HTTPException(400, f"The input cannot be read ({type(e).__name__}: {e}).") from None
        now = time.time()
        job = ServerJob(
            plan.job_id, user.name, body.credential, body.priority, body.webhook_url, data, plan.rows_total,
            data["output"]["path"], "queued", None, now, now,
        )
        db.add_job(job)
        sched.wake()
        log.info("job submitted", extra={"job_id": job.id, "user": user.name})
        return job_view(sched, job)

    @app.get("/jobs", response_model=list[JobView], tags=["jobs"])
    async def list_jobs(
        request: Request,
        status: Literal["queued", "running", "paused", "succeeded", "failed", "cancelled"] | None = None,
        owner: str | None = Query(None, max_length=64, description="Operators only: one user's jobs."),
        limit: int = Query(200, ge=1, le=1000),
        user: User = Depends(current_user),
    ) -> list[JobView]:
        """Your jobs, newest first (operators: everyone's)."""
        who = owner if user.is_operator else user.name
        return [job_view(_sched(request), j) for j in _db(request).list_jobs(owner=who, status=status, limit=limit)]

    @app.get("/jobs/{job_id}", response_model=JobView, tags=["jobs"])
    async def get_job(job_id: str, request: Request, user: User = Depends(current_user)) -> JobView:
        return job_view(_sched(request), _visible_job(request, user, job_id))

    @app.get("/jobs/{job_id}/progress", response_model=JobProgress, tags=["jobs"])
    async def progress(job_id: str, request: Request, user: User = Depends(current_user)) -> JobProgress:
        """The job now, and its counters over time (one point a second while it runs)."""
        sched = _sched(request)
        view = job_view(sched, _visible_job(request, user, job_id))
        series = [SeriesPoint(t=p.t, rows_done=p.rows_done, requests=p.requests, tokens=p.tokens, cost_usd=p.cost_usd, tpm_limit=p.tpm_limit, rpm_limit=p.rpm_limit) for p in sched.series(job_id)]
        return JobProgress(**view.model_dump(), series=series)

    @app.get("/jobs/{job_id}/events", tags=["jobs"], response_class=StreamingResponse, responses={200: {"content": {"text/event-stream": {}}}})
    async def events(job_id: str, request: Request, user: User = Depends(current_user)) -> StreamingResponse:
        """Server-sent events: a `progress` event (a JobView) every second, and `end` when the job stops."""
        _visible_job(request, user, job_id)
        sched, db, closing = _sched(request), _db(request), request.app.state.closing

        async def stream() -> AsyncIterator[str]:
            while not closing.is_set():
                job = db.get_job(job_id)
                if job is None:
                    return
                yield f"event: progress\ndata: {job_view(sched, job).model_dump_json()}\n\n"
                if job.status in (*TERMINAL, "paused"):
                    yield f"event: end\ndata: {{\"status\": \"{job.status}\"}}\n\n"
                    return
                try:
                    await asyncio.wait_for(closing.wait(), config.sse_every_s)
                except TimeoutError:
                    pass

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @app.get("/jobs/{job_id}/dead-letters", response_model=list[DeadLetterView], tags=["jobs"])
    async def dead_letters(job_id: str, request: Request, limit: int = Query(1000, ge=1, le=100000), user: User = Depends(current_user)) -> list[DeadLetterView]:
        """Rows that could not succeed, with the reason."""
        _visible_job(request, user, job_id)
        return [
            DeadLetterView(row_id=d.row_id, chunk_index=d.chunk_index, reason=d.reason, raw=d.raw[:2000] if d.raw else None)
            for d in _sched(request).store.dead_letters(job_id, limit=limit)
        ]

    @app.get("/jobs/{job_id}/output", tags=["jobs"], response_class=FileResponse, responses={200: {"content": {"application/octet-stream": {}}}, 409: {"description": "Not finished."}})
    async def output(job_id: str, request: Request, user: User = Depends(current_user)) -> FileResponse:
        """The result table (streamed from disk), once the job succeeded."""
        job = _visible_job(request, user, job_id)
        path = Path(job.output_path)
        if job.status != "succeeded" or not path.is_file():
            raise HTTPException(409, f"Job {job_id} is {job.status}; its output is ready when it has succeeded.")
        return FileResponse(path, filename=f"{job_id}{path.suffix}", media_type="application/octet-stream")

    @app.post("/jobs/{job_id}/pause", response_model=Done, tags=["jobs"])
    async def pause(job_id: str, request: Request, user: User = Depends(current_user)) -> Done:
        """Stop dispatching (answers in flight are kept); resume continues where it stopped."""
        job = _visible_job(request, user, job_id)
        if job.status not in ("queued", "running"):
            raise HTTPException(409, f"Job {job_id} is {job.status}; only a queued or running job can be paused.")
        _sched(request).pause(job, user.name)
        log.info("pause asked", extra={"job_id": job_id, "user": user.name})
        return Done(id=job_id, status="pausing" if job.status == "running" else "paused")

    @app.post("/jobs/{job_id}/resume", response_model=Done, tags=["jobs"])
    async def resume(job_id: str, request: Request, user: User = Depends(current_user)) -> Done:
        """Queue a paused or failed job again; answers already paid for are not paid again."""
        job = _visible_job(request, user, job_id)
        if job.status not in ("paused", "failed"):
            raise HTTPException(409, f"Job {job_id} is {job.status}; only a paused or failed job can be resumed.")
        _sched(request).resume(job)
        log.info("resume asked", extra={"job_id": job_id, "user": user.name})
        return Done(id=job_id, status="queued")

    @app.post("/jobs/{job_id}/cancel", response_model=Done, tags=["jobs"])
    async def cancel(job_id: str, request: Request, user: User = Depends(current_user)) -> Done:
        """Cancel a job; a running one stops within a second, keeping what was written."""
        job = _visible_job(request, user, job_id)
        if job.status in TERMINAL:
            raise HTTPException(409, f"Job {job_id} is already {job.status}.")
        _sched(request).cancel(job, user.name)
        log.info("cancel asked", extra={"job_id": job_id, "user": user.name})
        return Done(id=job_id, status="cancelling" if job.status == "running" else "cancelled")

    # --- operators --------------------------------------------------------------------------

    @app.get("/users", response_model=list[UserView], tags=["operators"])
    async def list_users(request: Request, _: User = Depends(operator)) -> list[UserView]:
        db, sched = _db(request), _sched(request)
        return [_user_view(db, sched, u) for u in db.list_users()]

    @app.post("/users", response_model=UserCreated, status_code=201, tags=["operators"])
    async def create_user(body: UserIn, request: Request, op: User = Depends(operator)) -> UserCreated:
        """Add a user; the token in the answer is shown once."""
        if _db(request).get_user(body.name) is not None:
            raise HTTPException(409, f"The user {body.name} exists already.")
        user, token = auth.add_user(_db(request), body.name, body.role)
        log.info("user added", extra={"user": op.name, "event": f"add {user.name}"})
        return UserCreated(name=user.name, role=user.role, token=token)

    @app.patch("/users/{name}", response_model=UserView, tags=["operators"])
    async def update_user(name: str, body: UserPatch, request: Request, op: User = Depends(operator)) -> UserView:
        """Change a user's weight (applied at once to the lanes they use), quotas or default webhook; null clears a quota."""
        db, sched = _db(request), _sched(request)
        if db.get_user(name) is None:
            raise HTTPException(404, f"There is no user {name}.")
        changes = {k: getattr(body, k) for k in body.model_fields_set}
        if "weight" in changes and changes["weight"] is None:
            raise HTTPException(400, "A weight must be a positive number.")
        db.update_user(name, **changes)
        if "weight" in changes:
            sched.reweight_user(name)
        sched.wake()
        log.info("user changed", extra={"user": op.name, "event": f"update {name}"})
        user = db.get_user(name)
        assert user is not None
        return _user_view(db, sched, user)

    @app.post("/credentials", response_model=CredentialView, status_code=201, tags=["operators"])
    async def put_credential(body: CredentialIn, request: Request, op: User = Depends(operator)) -> CredentialView:
        """Add or replace a named provider key; users name it in jobs and never see the key."""
        _db(request).put_credential(body.name, body.provider, body.base_url, body.api_key)
        log.info("credential stored", extra={"user": op.name, "event": f"credential {body.name}"})
        return CredentialView(name=body.name, provider=body.provider, base_url=body.base_url)

    @app.delete("/credentials/{name}", status_code=204, tags=["operators"])
    async def delete_credential(name: str, request: Request, _: User = Depends(operator)) -> Response:
        if not _db(request).remove_credential(name):
            raise HTTPException(404, f"There is no credential {name}.")
        return Response(status_code=204)

    @app.get("/lanes", response_model=list[LaneView], tags=["operators"])
    async def lanes(request: Request, _: User = Depends(operator)) -> list[LaneView]:
        """Each lane (endpoint, key, model): limits in force, use, 429s, over time."""
        return _lane_views(_db(request), _sched(request))

    @app.put("/lanes/{key}/limits", response_model=LaneView, tags=["operators"])
    async def set_lane_limits(key: str, body: LaneLimitsIn, request: Request, op: User = Depends(operator)) -> LaneView:
        """Set a lane's limits, live (null: use the jobs' own limits)."""
        db, sched = _db(request), _sched(request)
        if db.get_lane(key) is None:
            raise HTTPException(404, f"There is no lane {key}.")
        sched.set_lane_limits(key, body.rpm, body.tpm, body.max_in_flight)
        log.info("lane limits changed", extra={"user": op.name, "lane": key})
        return next(v for v in _lane_views(db, sched) if v.key == key)

    @app.get("/overview", response_model=Overview, tags=["operators"])
    async def overview(request: Request, _: User = Depends(operator)) -> Overview:
        """Queue depth, jobs by status, every user's spend and share, every lane."""
        db, sched = _db(request), _sched(request)
        counts = db.count_by_status()
        return Overview(
            queue_depth=counts.get("queued", 0), jobs_by_status=counts,
            users=[_user_view(db, sched, u) for u in db.list_users()], lanes=_lane_views(db, sched),
        )

    @app.get("/metrics", tags=["operators"], response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics(request: Request, _: User = Depends(operator)) -> Response:
        """Prometheus metrics (scrape with an operator token as the bearer token)."""
        return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
