"""The HTTP API (FastAPI; OpenAPI at /docs) and the dashboard's static files, over the scheduler.

A user sees and acts on their own jobs only (another's is a 404) and uses only the credentials granted to
them; operators see and act on all, and set what users cannot change: credentials and their grants, prices,
lane limits and caps. Provider keys go in through POST /credentials, encrypted, and never come out.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from backfill.engine import make_plan
from backfill.errors import BackfillError
from backfill.server import auth, headers
from backfill.server.auth import current_user, operator
from backfill.server.bodylimit import BodyLimit
from backfill.server.caps import DEFAULT_MAX_BODY_BYTES, Caps, Settings, check_rows, hold_to_caps
from backfill.server.db import TERMINAL, Delivery, Credential, ServerDB, ServerJob, User, private_dir
from backfill.server.inputs import refuse_url, resolve_allowed, save_upload, upload_too_large
from backfill.server.logs import log
from backfill.server.metrics import Metrics
from backfill.server.scheduler import Scheduler, cache_scope, cache_shared, operator_prices
from backfill.server.secrets import open_box
from backfill.server.webhooks import Webhooks
from backfill.spec import PriceSpec, build_spec

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
    webhook_allow: list[str] = field(default_factory=list)  # networks webhooks may reach though not public (CIDR)
    shutdown_grace_s: float = 15.0
    sse_every_s: float = 1.0
    secret_keys: list[str] = field(default_factory=list)  # Fernet keys, newest first; none: no provider keys stored
    max_streams_per_user: int = 4
    sweep_every_s: float = 60.0  # how often uploads past their retention are looked for


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
    jobs_at_once: int = Field(description="Jobs of yours that run at once.")
    caps: Caps = Field(description="What your jobs are held to (set by operators).")


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
    rows_ok: int  # answered, committed or not (as the live line counts them)
    rows_failed: int
    rows_committed: int  # in committed chunks, as the ledger counts them
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
    cache: Literal["per user", "shared"] = Field(description="Whose cached answers the job reuses: its owner's, or the team's on a shared credential.")


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


class DeliveryView(BaseModel):
    id: int
    url: str
    event: str
    state: Literal["pending", "delivered", "failed"]
    attempts: int
    last_error: str | None = Field(description="Why the last attempt failed (HTTP status, timeout, refused address).")
    next_try_at: float | None = Field(description="When a pending delivery is tried next (Unix time).")


def delivery_view(d: Delivery) -> DeliveryView:
    state: Literal["pending", "delivered", "failed"] = "pending" if not d.done else "failed" if d.last_error else "delivered"
    return DeliveryView(id=d.id, url=d.url, event=d.event, state=state, attempts=d.attempts, last_error=d.last_error or None, next_try_at=None if d.done else d.next_at)


class UserIn(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)
    role: Literal["user", "operator"] = "user"


class UserCreated(BaseModel):
    name: str
    role: str
    token: str = Field(description="Shown once; only its hash is stored.")


class UserPatch(Caps):
    """A user's weight, quotas, default webhook and caps; a field sent as null clears it (for a cap: the server's applies)."""

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
    caps: Caps = Field(description="The user's own caps (null: the server's apply).")


class CredentialIn(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)
    provider: Literal["sim", "openai", "azure", "anthropic"]
    base_url: str | None = Field(None, pattern=URL_PATTERN, max_length=2000)
    api_key: str | None = Field(None, max_length=4000)
    show_base_url: bool = Field(False, description="Users granted it see its base URL.")
    cache_shared: bool = Field(False, description="One response cache for every user of it (default: one per user).")
    prices: dict[str, PriceSpec] = Field(default_factory=dict, description="USD per 1M tokens by model, over the server's table.")


class CredentialView(BaseModel):
    name: str
    provider: str
    base_url: str | None = Field(description="Shown to operators, and to users where the operator allows it.")
    cache: Literal["per user", "shared"] = Field(description="Whose cached answers a job on it may reuse.")
    users: list[str] | None = Field(None, description="Who may use it (operators only).")


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


def credential_view(db: ServerDB, cred: Credential, user: User) -> CredentialView:
    return CredentialView(
        name=cred.name, provider=cred.provider,
        base_url=cred.base_url if user.is_operator or cred.show_base_url else None,
        cache="shared" if cred.cache_shared else "per user",
        users=db.grantees(cred.name) if user.is_operator else None,
    )


def begin_shutdown(app: FastAPI) -> None:
    """The first thing a SIGTERM does: stop dispatching and end the event streams, so the HTTP server's drain
    (which waits for open connections) cannot keep jobs sending; the lifespan's end then awaits answers in flight."""
    closing = getattr(app.state, "closing", None)
    if closing is None:
        return
    closing.set()
    app.state.sched.stop_dispatch()


# --- the app -------------------------------------------------------------------------------


def create_app(config: ServerConfig) -> FastAPI:
    """The server: API, dashboard, metrics, and the scheduler and webhook sender running inside it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        private_dir(config.data_dir)
        db = ServerDB(config.data_dir / "server.db", box=open_box(config.secret_keys))
        metrics = Metrics()
        webhooks = Webhooks(db, backoff_s=config.webhook_backoff_s, max_attempts=config.webhook_max_attempts, allow=config.webhook_allow)
        sched = Scheduler(
            db, config.data_dir, metrics, webhooks, max_running=config.max_running, tick_s=config.tick_s,
            shutdown_grace_s=config.shutdown_grace_s, sweep_every_s=config.sweep_every_s,
        )
        app.state.db, app.state.metrics, app.state.sched = db, metrics, sched
        app.state.max_body = db.get_settings().max_body_bytes or DEFAULT_MAX_BODY_BYTES
        app.state.streams = Counter()
        app.state.loop = asyncio.get_running_loop()
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
        docs_url=None,  # served by headers.install from the packaged assets, not a CDN
        redoc_url=None,
    )
    app.state.config = config
    headers.install(app)
    app.state.max_body = DEFAULT_MAX_BODY_BYTES
    app.add_middleware(BodyLimit, limit=lambda: app.state.max_body)

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
        rows_committed=stats.rows_committed if stats else (rec.rows_done if rec else 0),
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
        cache="shared" if cache_shared(job.cache_scope) else "per user",
    )


def _user_view(db: ServerDB, sched: Scheduler, u: User) -> UserView:
    day, month = db.spend(u.name)
    return UserView(
        name=u.name, role=u.role, weight=u.weight, max_jobs=u.max_jobs, usd_per_day=u.usd_per_day, usd_per_month=u.usd_per_month,
        spent_today_usd=day, spent_month_usd=month,
        running=sum(1 for rj in sched.running.values() if rj.job.owner == u.name),
        queued=len(db.list_jobs(owner=u.name, status="queued", limit=10000)),
        caps=u.caps,
    )


def _check_sources(given: dict[str, Any]) -> None:
    """Endpoints, keys and locations come from what the operator registered (credentials, uploads, allowed
    directories), never from a user's spec: each such field set by the user is a 400 naming it."""
    task = given.get("task") or {}
    if given.get("prices"):
        raise HTTPException(400, "A job on this server cannot set prices: the server bills by its operators' table; remove `prices`.")
    if task.get("api_key_env"):
        raise HTTPException(400, "A job on this server cannot name an environment variable for its key; name a credential (GET /credentials).")
    if task.get("base_url"):
        raise HTTPException(400, "A job on this server cannot set task.base_url; name a credential (GET /credentials), which carries it.")
    refuse_url((given.get("input") or {}).get("path"), "input path")
    refuse_url((given.get("output") or {}).get("path"), "output path")


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
        sched = _sched(request)
        caps = sched.caps_for(user)
        return MeView(
            name=user.name, role=user.role, weight=user.weight, max_jobs=user.max_jobs, usd_per_day=user.usd_per_day,
            usd_per_month=user.usd_per_month, spent_today_usd=day, spent_month_usd=month, webhook_url=user.webhook_url,
            webhook_secret=user.webhook_secret, jobs_at_once=sched.max_jobs_for(user), caps=caps,
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
        """The credentials you may name in a job (operators: all), never their keys."""
        db = _db(request)
        creds = db.list_credentials(None if user.is_operator else user.name)
        return [credential_view(db, c, user) for c in creds]

    # --- input --------------------------------------------------------------------------

    @app.post(
        "/uploads", response_model=UploadView, status_code=201, tags=["jobs"],
        openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
    )
    async def upload(request: Request, filename: str = Query("input", max_length=200), user: User = Depends(current_user)) -> UploadView:
        """Stream an input file (the raw request body) to the server; name it with `filename` so its extension tells the format."""
        max_bytes = _sched(request).caps_for(user).max_upload_bytes
        length = request.headers.get("content-length", "")
        if max_bytes is not None and length.isdigit() and int(length) > max_bytes:
            raise upload_too_large(max_bytes)
        up = await save_upload(_db(request), config.data_dir, user.name, filename, request.stream(), max_bytes)
        log.info("upload stored", extra={"user": user.name})
        return UploadView(upload_id=up.id, filename=up.filename, size=up.size)

    # --- jobs -------------------------------------------------------------------------------

    @app.post("/jobs", response_model=JobView, status_code=201, tags=["jobs"])
    async def submit(body: SubmitJob, request: Request, user: User = Depends(current_user)) -> JobView:
        """Submit a job: checked at once (columns, template, schema, model) before it is queued."""
        db, sched = _db(request), _sched(request)
        _check_sources(body.spec)
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
        cred = None
        if body.credential is not None:
            cred = db.get_credential(body.credential)
            if cred is None or not db.may_use(cred.name, user.name):
                raise HTTPException(400, f"There is no credential {body.credential} that you may use; GET /credentials lists yours.")
            task["provider"], task["base_url"], api_key = cred.provider, cred.base_url, cred.api_key
        elif task["provider"] != "sim":
            raise HTTPException(400, "Name a credential for this provider; GET /credentials lists them.")
        task["api_key_env"] = None  # keys come from credentials only, never from the server's environment
        data["prices"] = operator_prices(sched.settings, cred)
        caps = sched.caps_for(user)
        hold_to_caps(data, body.spec, caps)
        out_dir = config.data_dir / "outputs" / uuid.uuid4().hex
        private_dir(out_dir)
        ext = OUTPUT_EXT.get(data["output"].get("format") or "parquet", "parquet")
        data["output"]["path"] = str(out_dir / f"result.{ext}")
        data["owner"] = user.name
        spec = build_spec(data)
        try:
            plan = await asyncio.to_thread(make_plan, spec, api_key=api_key)
        except (OSError, ValueError, pa.ArrowException) as e:
            raise HTTPException(400, f"The input cannot be read ({type(e).__name__}: {e}).") from None
        check_rows(plan.rows_total, caps)
        now = time.time()
        job = ServerJob(
            plan.job_id, user.name, body.credential, body.priority, body.webhook_url, data, plan.rows_total,
            data["output"]["path"], "queued", None, now, now, cache_scope(user.name, cred),
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
        streams: Counter[str] = request.app.state.streams
        if closing.is_set():
            raise HTTPException(503, "The server is shutting down; try again when it is back.")
        if streams[user.name] >= config.max_streams_per_user:
            raise HTTPException(429, f"You have {streams[user.name]} event streams open, this server's most per user; close one, or poll GET /jobs/{{id}}.")
        streams[user.name] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                streams[user.name] -= 1
                if streams[user.name] <= 0:
                    del streams[user.name]

        async def stream() -> AsyncIterator[str]:
            try:
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
            finally:
                release()

        # The background task runs even when the client went away before the generator was entered.
        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}, background=BackgroundTask(release))

    @app.get("/jobs/{job_id}/dead-letters", response_model=list[DeadLetterView], tags=["jobs"])
    async def dead_letters(job_id: str, request: Request, limit: int = Query(1000, ge=1, le=100000), user: User = Depends(current_user)) -> list[DeadLetterView]:
        """Rows that could not succeed, with the reason."""
        _visible_job(request, user, job_id)
        return [
            DeadLetterView(row_id=d.row_id, chunk_index=d.chunk_index, reason=d.reason, raw=d.raw[:2000] if d.raw else None)
            for d in _sched(request).store.dead_letters(job_id, limit=limit)
        ]

    @app.get("/jobs/{job_id}/deliveries", response_model=list[DeliveryView], tags=["jobs"])
    async def deliveries(job_id: str, request: Request, user: User = Depends(current_user)) -> list[DeliveryView]:
        """The job's webhook deliveries: attempts, state, last error and next try."""
        _visible_job(request, user, job_id)
        return [delivery_view(d) for d in _db(request).job_deliveries(job_id)]

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
        """Change a user's weight (applied at once to the lanes they use), quotas, default webhook or caps; null clears one."""
        db, sched = _db(request), _sched(request)
        target = db.get_user(name)
        if target is None:
            raise HTTPException(404, f"There is no user {name}.")
        changes = {k: getattr(body, k) for k in body.model_fields_set if k not in Caps.model_fields}
        cap_changes = {k: getattr(body, k) for k in body.model_fields_set if k in Caps.model_fields}
        if cap_changes:
            changes["caps_json"] = target.caps.model_copy(update=cap_changes).model_dump_json(exclude_none=True)
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
        """Add or replace a named provider key (stored encrypted; its grants stay); users it is granted to name it in
        jobs and never see the key."""
        db = _db(request)
        db.put_credential(
            body.name, body.provider, body.base_url, body.api_key, show_base_url=body.show_base_url,
            cache_shared=body.cache_shared, prices={m: p.model_dump() for m, p in body.prices.items()},
        )
        log.info("credential stored", extra={"user": op.name, "event": f"credential {body.name}"})
        cred = db.get_credential(body.name)
        assert cred is not None
        return credential_view(db, cred, op)

    @app.delete("/credentials/{name}", status_code=204, tags=["operators"])
    async def delete_credential(name: str, request: Request, _: User = Depends(operator)) -> Response:
        if not _db(request).remove_credential(name):
            raise HTTPException(404, f"There is no credential {name}.")
        return Response(status_code=204)

    @app.put("/credentials/{name}/users/{user_name}", response_model=CredentialView, tags=["operators"])
    async def grant_credential(name: str, user_name: str, request: Request, op: User = Depends(operator)) -> CredentialView:
        """Let a user name this credential in their jobs."""
        db = _db(request)
        cred = db.get_credential(name)
        if cred is None or db.get_user(user_name) is None:
            raise HTTPException(404, f"There is no credential {name} or no user {user_name}.")
        db.grant(name, user_name)
        log.info("credential granted", extra={"user": op.name, "event": f"grant {name} to {user_name}"})
        return credential_view(db, cred, op)

    @app.delete("/credentials/{name}/users/{user_name}", status_code=204, tags=["operators"])
    async def revoke_credential(name: str, user_name: str, request: Request, op: User = Depends(operator)) -> Response:
        """Stop a user from naming this credential; their jobs on it fail at their next start."""
        if not _db(request).revoke(name, user_name):
            raise HTTPException(404, f"The credential {name} is not granted to {user_name}.")
        log.info("credential revoked", extra={"user": op.name, "event": f"revoke {name} from {user_name}"})
        return Response(status_code=204)

    @app.get("/settings", response_model=Settings, tags=["operators"])
    async def get_settings(request: Request, _: User = Depends(operator)) -> Settings:
        """Server-wide caps and prices."""
        return _sched(request).settings

    @app.put("/settings", response_model=Settings, tags=["operators"])
    async def put_settings(body: Settings, request: Request, op: User = Depends(operator)) -> Settings:
        """Replace the server-wide caps and prices (a user's own caps, set with PATCH /users/{name}, win over these)."""
        sched = _sched(request)
        sched.put_settings(body)
        request.app.state.max_body = body.max_body_bytes or DEFAULT_MAX_BODY_BYTES
        log.info("settings changed", extra={"user": op.name, "event": "settings"})
        return sched.settings

    @app.get("/lanes", response_model=list[LaneView], tags=["operators"])
    async def lanes(request: Request, _: User = Depends(operator)) -> list[LaneView]:
        """Each lane (endpoint, key, model): limits in force, use, 429s, over time."""
        return _lane_views(_db(request), _sched(request))

    @app.put("/lanes/{key}/limits", response_model=LaneView, tags=["operators"])
    async def set_lane_limits(key: str, body: LaneLimitsIn, request: Request, op: User = Depends(operator)) -> LaneView:
        """Set a lane's limits, live (null: what the provider's headers say). A job's own limits only slow that job."""
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
