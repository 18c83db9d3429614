"""The simulator's HTTP server: OpenAI and Anthropic wire protocols over aiohttp's low-level server.

`Simulator` runs in-process on an ephemeral port (`async with Simulator(cfg) as sim`) or in a
background thread with its own loop for synchronous callers (`with Simulator(cfg) as sim`, or
`start_in_thread()` / `stop()`).

A request meets, in order: its JSON body (400), its key (401), its model (404), validation (400; a
`response_format` type the config rejects gets 400, 422 or 500), the context window (400), a scheduled outage, an exhausted quota, the rate limits (429), then one fault
draw. A faulted request still counts against the limits. Responses on a lane with limits (key and
model known) carry the rate-limit headers; 401, 404 and unparseable bodies do not, as at the
providers. Streaming is not simulated (400).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import math
import random
import threading
import time
from array import array
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import orjson
from aiohttp import web
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader

from backfill.sim.answers import (
    Answer,
    Lengths,
    chat_answer,
    content_text,
    embedding_vector,
    messages_answer,
    request_digest,
    truncate,
)
from backfill.sim.config import KeyLimits, ModelInfo, SimConfig
from backfill.sim.faults import Fault, FaultInjector
from backfill.sim.log import LogEntry, RequestLog
from backfill.sim.ratelimit import Lane, Refusal, format_duration
from backfill.tokens import count_messages, count_text

_MAX_BODY = 64 * 1024 * 1024
_MAX_EMBEDDING_INPUTS = 2048
_MAX_EMBEDDING_TOKENS = 300_000
_MAX_DIMENSIONS = 3072
_SHUTDOWN_GRACE_S = 0.5
_JSON = "application/json"
_OPENAI_LIMIT_WORDS = {"requests": ("requests", "RPM"), "tokens": ("tokens", "TPM")}


def _dumps(value: Any) -> bytes:
    # orjson: the stdlib's encoder and decoder were a tenth of the sim's CPU per request.
    return orjson.dumps(value)


class _Reply(Exception):
    """An early answer (an error, or None for a reset connection); carries the response and the log event."""

    def __init__(self, response: web.Response | None, event: str = "") -> None:
        self.response = response
        self.event = event


def _openai_error(
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.Response(body=_dumps(body), status=status, headers=headers, content_type=_JSON)


def _anthropic_error(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"type": "error", "error": {"type": type_, "message": message}}
    return web.Response(body=_dumps(body), status=status, headers=headers, content_type=_JSON)


_FORMAT_TYPES = ("text", "json_object", "json_schema")


def _format_rejection(status: int, kind: str, accepted: list[str]) -> web.Response:
    """The body a server without a response_format type sends: OpenAI's 400, FastAPI's 422 (vLLM and
    many proxies validate with pydantic), or a 500 from a server that fails inside validation."""
    if status == 422:
        expected = " or ".join(repr(t) for t in accepted)
        body: dict[str, Any] = {
            "detail": [
                {
                    "type": "literal_error",
                    "loc": ["body", "response_format", "type"],
                    "msg": f"Input should be {expected}",
                    "input": kind,
                    "ctx": {"expected": expected},
                }
            ]
        }
    elif status == 500:
        body = {
            "error": {
                "message": f"Internal error while preparing the response_format: type '{kind}' is not supported.",
                "type": "server_error",
                "param": "response_format",
                "code": None,
            }
        }
    else:
        body = {
            "error": {
                "message": f"Invalid parameter: 'response_format' of type '{kind}' is not supported with this model.",
                "type": "invalid_request_error",
                "param": "response_format",
                "code": None,
            }
        }
    return web.Response(body=_dumps(body), status=status, content_type=_JSON)


def _retry_headers(seconds: float) -> dict[str, str]:
    return {"retry-after": str(max(1, math.ceil(seconds))), "retry-after-ms": str(max(1, math.ceil(seconds * 1000)))}


class Simulator:
    """A local OpenAI- and Anthropic-compatible server with the providers' limits, latency and faults."""

    def __init__(self, config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config or SimConfig()
        self.host = host
        self.port = port
        self.log = RequestLog(self.config.log_path, self.config.log_in_memory)
        self._faults = FaultInjector(self.config.faults, self.config.outages, self.config.seed)
        self._latency_rng = random.Random(self.config.seed + 1)
        self._lengths = Lengths(self.config.output_tokens_mean, self.config.output_tokens_sigma)
        busy = max(0.0, self.config.latency_s - self.config.ttft_s)
        self._per_token_s = busy / self.config.output_tokens_mean if self.config.output_tokens_mean > 0 else 0.0
        self._lanes: dict[tuple[str, str], Lane] = {}
        self._rejected_formats = {
            kind: status
            for kind, status in (
                ("json_schema", self.config.reject_json_schema),
                ("json_object", self.config.reject_json_object),
            )
            if status is not None
        }
        self._fingerprints: dict[str, str] = {}
        self._ids = itertools.count(1)
        self._t0 = time.monotonic()
        self._slots: asyncio.Semaphore | None = None
        self._runner: web.ServerRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._post: dict[str, Callable[[web.BaseRequest, LogEntry], Awaitable[web.StreamResponse | None]]] = {
            "/v1/chat/completions": self._chat,
            "/v1/embeddings": self._embeddings,
            "/v1/messages": self._messages,
        }

    # ---- running -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Root URL, e.g. http://127.0.0.1:PORT (the Anthropic SDK's base_url)."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL, e.g. http://127.0.0.1:PORT/v1."""
        return f"{self.url}/v1"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        count_text("warm up")  # loads the tokenizer now rather than inside the first request
        if self.config.max_concurrency is not None:
            self._slots = asyncio.Semaphore(self.config.max_concurrency)

        def make_request(
            message: RawRequestMessage, payload: StreamReader, protocol: Any, writer: Any, task: Any
        ) -> web.BaseRequest:
            return web.BaseRequest(message, payload, protocol, writer, task, loop, client_max_size=_MAX_BODY)

        server = web.Server(self._handle, request_factory=make_request, access_log=None)
        self._runner = web.ServerRunner(server, shutdown_timeout=_SHUTDOWN_GRACE_S)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._t0 = time.monotonic()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.log.close()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start_in_thread(self) -> Simulator:
        """Serve from a daemon thread with its own event loop; returns once listening."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # handed to the caller's thread below
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.close())
            loop.close()

        self._thread = threading.Thread(target=run, name="backfill-sim", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        """Stop a simulator started with `start_in_thread()`."""
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> Simulator:
        return self.start_in_thread()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- dispatch ------------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        started = time.monotonic()
        entry = LogEntry(started - self._t0, "", path, "", 0, "", 0, 0, 0.0, False, 0)
        try:
            endpoint = self._post.get(path) if request.method == "POST" else None
            if endpoint is not None:
                response = await endpoint(request, entry)
            elif request.method == "GET" and (path == "/v1/models" or path.startswith("/v1/models/")):
                response = self._models(request, entry, self._is_anthropic(request))
            else:
                response = self._not_found(path, self._is_anthropic(request))
        except _Reply as reply:
            response, entry.event = reply.response, reply.event or entry.event
        entry.latency_s = time.monotonic() - started
        entry.status = 0 if response is None else response.status
        self.log.append(entry)
        if response is None:  # connection reset: nothing may be written
            raise asyncio.CancelledError
        return response

    @staticmethod
    def _is_anthropic(request: web.BaseRequest) -> bool:
        headers = request.headers
        return request.path == "/v1/messages" or "x-api-key" in headers or "anthropic-version" in headers

    def _not_found(self, path: str, anthropic: bool) -> web.Response:
        if anthropic:
            return _anthropic_error(404, "not_found_error", f"Not found: {path}")
        return _openai_error(404, f"Invalid URL (POST {path})", "invalid_request_error")

    # ---- shared steps --------------------------------------------------------------------------

    async def _read_json(self, request: web.BaseRequest, anthropic: bool) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            message = "We could not parse the JSON body of your request; send a JSON object."
            raise _Reply(
                _anthropic_error(400, "invalid_request_error", message)
                if anthropic
                else _openai_error(400, message, "invalid_request_error")
            )
        return body

    def _authenticate(self, request: web.BaseRequest, entry: LogEntry, anthropic: bool) -> tuple[str, KeyLimits]:
        key = request.headers.get("x-api-key") if anthropic else None
        if key is None:
            auth = request.headers.get("Authorization", "")
            key = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        keys = self.config.keys
        limits = (keys.get(key) if key is not None else None) if keys else self.config.default_limits
        entry.key = self._fingerprint(key)
        if limits is None:
            if anthropic:
                raise _Reply(_anthropic_error(401, "authentication_error", "invalid x-api-key"), "auth")
            message = (
                "You didn't provide an API key; send it in the Authorization header as 'Bearer KEY'."
                if key is None
                else "Incorrect API key provided; check the key the simulator was started with."
            )
            raise _Reply(_openai_error(401, message, "invalid_request_error", "invalid_api_key"), "auth")
        return key or "", limits

    def _fingerprint(self, key: str | None) -> str:
        if key is None:
            return "none"
        fp = self._fingerprints.get(key)
        if fp is None:
            fp = self._fingerprints[key] = "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]
        return fp

    def _model(self, body: dict[str, Any], entry: LogEntry, anthropic: bool, kind: str) -> tuple[str, ModelInfo]:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            message = "model: Field required" if anthropic else "you must provide a model parameter"
            raise _Reply(self._bad_request(message, anthropic, "model"))
        entry.model = model
        info = self.config.models.get(model)
        if info is None:
            if anthropic:
                raise _Reply(_anthropic_error(404, "not_found_error", f"model: {model}"), "model")
            message = f"The model `{model}` does not exist or you do not have access to it."
            raise _Reply(_openai_error(404, message, "invalid_request_error", "model_not_found"), "model")
        if info.kind != kind:
            message = (
                f"The model `{model}` is an embedding model, not a chat model."
                if kind == "chat"
                else f"The model `{model}` is a chat model and does not support embeddings."
            )
            if anthropic:
                raise _Reply(_anthropic_error(404, "not_found_error", f"model: {model}"), "model")
            raise _Reply(_openai_error(404, message, "invalid_request_error", "model_not_found"), "model")
        return model, info

    def _bad_request(
        self,
        message: str,
        anthropic: bool,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        if anthropic:
            return _anthropic_error(400, "invalid_request_error", message, headers)
        return _openai_error(400, message, "invalid_request_error", code, param, headers)

    def _lane(self, key: str, model: str, limits: KeyLimits, now: float) -> Lane:
        lane = self._lanes.get((key, model))
        if lane is None:
            lane = self._lanes[(key, model)] = Lane(limits, self.config.burst_s, now)
        return lane

    def _request_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):012x}"

    @staticmethod
    def _lane_headers(lane: Lane, anthropic: bool) -> dict[str, str]:
        now = time.monotonic()
        return lane.anthropic_headers(now) if anthropic else lane.openai_headers(now)

    def _gate(self, entry: LogEntry, limits: KeyLimits, anthropic: bool, lane: Lane) -> None:
        """Refuse the request if a scheduled outage covers its arrival or its key is out of quota."""
        outage = self._faults.outage_at(entry.t)
        if outage is None and not limits.quota_exhausted:
            return
        headers = self._lane_headers(lane, anthropic)
        if outage is not None:
            if outage.status == 429:
                wait = _retry_headers(outage.end_s - entry.t)
                raise _Reply(
                    self._rate_limited("requests", "the simulator's scheduled outage", anthropic, {**headers, **wait}),
                    "outage",
                )
            raise _Reply(self._server_error(outage.status, anthropic, headers), "outage")
        if anthropic:
            message = "Your credit balance is too low to access the API; add credits to this account."
            raise _Reply(_anthropic_error(400, "invalid_request_error", message, headers), "quota")
        message = "You exceeded your current quota; check your plan and billing details."
        raise _Reply(_openai_error(429, message, "insufficient_quota", "insufficient_quota", None, headers), "quota")

    def _rate_limited(self, type_: str, message: str, anthropic: bool, headers: dict[str, str]) -> web.Response:
        if anthropic:
            return _anthropic_error(429, "rate_limit_error", f"This request would exceed {message}.", headers)
        return _openai_error(429, f"Rate limit reached: {message}.", type_, "rate_limit_exceeded", None, headers)

    def _refused(self, refusal: Refusal, model: str, anthropic: bool, headers: dict[str, str]) -> _Reply:
        name = refusal.limit_name.replace("_", " ")
        if refusal.retry_after_s is None:
            message = (
                f"Request too large for {model} on {name} per min: Limit {int(refusal.limit)}, Requested "
                f"{int(refusal.requested)}. The input or output tokens must be reduced in order to run successfully."
            )
            if anthropic:
                return _Reply(_anthropic_error(429, "rate_limit_error", message, headers), "too_large")
            return _Reply(_openai_error(429, message, "tokens", "rate_limit_exceeded", None, headers), "too_large")
        wait = refusal.retry_after_s
        headers = {**headers, **_retry_headers(wait)}
        if anthropic:
            message = (
                f"This request would exceed the rate limit of {int(refusal.limit)} {name} per minute for {model}. "
                f"Please try again in {format_duration(wait)}."
            )
            return _Reply(_anthropic_error(429, "rate_limit_error", message, headers), "rate_limited")
        words, abbr = _OPENAI_LIMIT_WORDS.get(refusal.limit_name, (name, ""))
        message = (
            f"Rate limit reached for {model} on {words} per min ({abbr}): Limit {int(refusal.limit)}, "
            f"Requested {int(refusal.requested)}. Please try again in {format_duration(wait)}."
        )
        type_ = "requests" if refusal.limit_name == "requests" else "tokens"
        return _Reply(_openai_error(429, message, type_, "rate_limit_exceeded", None, headers), "rate_limited")

    def _server_error(self, status: int, anthropic: bool, headers: dict[str, str]) -> web.Response:
        if anthropic:
            if status == 529:
                return _anthropic_error(529, "overloaded_error", "Overloaded", headers)
            return _anthropic_error(status, "api_error", "Internal server error", headers)
        if status == 500:
            message = "The server had an error while processing your request. Sorry about that!"
            return _openai_error(500, message, "server_error", None, None, headers)
        return _openai_error(503, "The server is overloaded or not ready yet.", "server_error", None, None, headers)

    def _latency(self, output_tokens: int) -> float:
        base = self.config.ttft_s + self._per_token_s * output_tokens
        if base <= 0:
            return 0.0
        sigma = self.config.latency_sigma
        if sigma <= 0:
            return base
        return base * self._latency_rng.lognormvariate(-sigma * sigma / 2, sigma)

    async def _serve_fault(
        self, fault: Fault | None, request: web.BaseRequest, entry: LogEntry, anthropic: bool, lane: Lane
    ) -> None:
        """Apply a fault drawn for an admitted request that ends it early (errors, resets) or delays it."""
        if fault is None:
            return
        entry.event = fault.value
        if fault is Fault.TRUNCATE or fault is Fault.MALFORMED:
            return
        if fault is Fault.RESET:
            if request.transport is not None:
                request.transport.abort()
            raise _Reply(None, fault.value)
        if fault is Fault.HANG:
            await self._wait(self.config.faults.hang_s)
            return
        status = {Fault.ERROR_500: 500, Fault.ERROR_503: 503}.get(fault, 529 if anthropic else 503)
        raise _Reply(self._server_error(status, anthropic, self._lane_headers(lane, anthropic)), fault.value)

    async def _wait(self, seconds: float) -> None:
        if self._slots is None:
            if seconds > 0:
                await asyncio.sleep(seconds)
            return
        async with self._slots:  # a self-hosted server: requests beyond the cap queue for a slot
            if seconds > 0:
                await asyncio.sleep(seconds)

    def _finish(self, payload: dict[str, Any], fault: Fault | None, headers: dict[str, str]) -> web.Response:
        body = _dumps(payload)
        if fault is Fault.MALFORMED:
            body = body[: len(body) // 2]
        return web.Response(body=body, headers=headers, content_type=_JSON)

    # ---- OpenAI --------------------------------------------------------------------------------

    async def _chat(self, request: web.BaseRequest, entry: LogEntry) -> web.StreamResponse | None:
        body = await self._read_json(request, False)
        key, limits = self._authenticate(request, entry, False)
        model, info = self._model(body, entry, False, "chat")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise _Reply(self._bad_request("messages must be a non-empty array of message objects.", False, "messages"))
        if body.get("stream"):
            raise _Reply(
                self._bad_request("The simulator does not stream; send the request without stream.", False, "stream")
            )
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise _Reply(self._bad_request("max_tokens must be a positive integer.", False, "max_tokens"))
        if self._rejected_formats:
            self._check_response_format(body.get("response_format"))
        now = time.monotonic()
        entry.t = now - self._t0
        digest = request_digest(body)
        entry.request_hash = digest.hex()
        prompt_tokens = entry.prompt_tokens = count_messages(messages, model)
        lane = self._lane(key, model, limits, now)
        if prompt_tokens + (max_tokens or 0) > info.context_window:
            message = (
                f"This model's maximum context length is {info.context_window} tokens. However, you requested "
                f"{prompt_tokens + (max_tokens or 0)} tokens ({prompt_tokens} in the messages, {max_tokens or 0} in "
                "the completion). Please reduce the length of the messages or completion."
            )
            headers = lane.openai_headers(now)
            raise _Reply(self._bad_request(message, False, "messages", "context_length_exceeded", headers), "context")
        self._gate(entry, limits, False, lane)
        charge = prompt_tokens + (max_tokens or self.config.default_max_tokens)
        refusal = lane.admit_openai(charge, now)
        if refusal is not None:
            raise self._refused(refusal, model, False, lane.openai_headers(now))
        entry.admitted, entry.charged_tokens = True, charge
        fault = self._faults.draw()
        await self._serve_fault(fault, request, entry, False, lane)
        answer = chat_answer(body, self._lengths, digest)
        if fault is Fault.TRUNCATE:
            answer = truncate(answer, model)
        entry.output_tokens = answer.output_tokens
        await self._wait(self._latency(answer.output_tokens))
        payload = {
            "id": self._request_id("chatcmpl-"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": self._openai_message(answer),
                    "logprobs": None,
                    "finish_reason": answer.openai_finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": answer.output_tokens,
                "total_tokens": prompt_tokens + answer.output_tokens,
            },
            "system_fingerprint": "fp_backfill_sim",
        }
        headers = lane.openai_headers(time.monotonic())
        headers["x-request-id"] = self._request_id("req_")
        return self._finish(payload, fault, headers)

    def _check_response_format(self, fmt: Any) -> None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        status = self._rejected_formats.get(kind) if isinstance(kind, str) else None
        if status is not None:
            accepted = [t for t in _FORMAT_TYPES if t not in self._rejected_formats]
            raise _Reply(_format_rejection(status, kind, accepted), "response_format")

    def _openai_message(self, answer: Answer) -> dict[str, Any]:
        if answer.tool_name is None:
            return {"role": "assistant", "content": answer.text, "refusal": None}
        call = {
            "id": self._request_id("call_"),
            "type": "function",
            "function": {"name": answer.tool_name, "arguments": answer.text},
        }
        return {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}

    async def _embeddings(self, request: web.BaseRequest, entry: LogEntry) -> web.StreamResponse | None:
        body = await self._read_json(request, False)
        key, limits = self._authenticate(request, entry, False)
        model, info = self._model(body, entry, False, "embedding")
        texts = self._embedding_inputs(body.get("input"))
        dim = body.get("dimensions", self.config.embedding_dim)
        if not isinstance(dim, int) or not 1 <= dim <= _MAX_DIMENSIONS:
            raise _Reply(
                self._bad_request(f"dimensions must be an integer from 1 to {_MAX_DIMENSIONS}.", False, "dimensions")
            )
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise _Reply(self._bad_request("encoding_format must be 'float' or 'base64'.", False, "encoding_format"))
        now = time.monotonic()
        entry.t = now - self._t0
        digest = request_digest(body)
        entry.request_hash = digest.hex()
        counts = [len(t) if isinstance(t, list) else count_text(t, model) for t in texts]
        total = entry.prompt_tokens = sum(counts)
        lane = self._lane(key, model, limits, now)
        longest = max(counts)
        if longest > info.context_window or total > _MAX_EMBEDDING_TOKENS:
            self._too_long(lane, info, longest, total)
        self._gate(entry, limits, False, lane)
        refusal = lane.admit_openai(total, now)
        if refusal is not None:
            raise self._refused(refusal, model, False, lane.openai_headers(now))
        entry.admitted, entry.charged_tokens = True, total
        fault = self._faults.draw()
        await self._serve_fault(fault, request, entry, False, lane)
        data = []
        for i, text in enumerate(texts):
            vector = embedding_vector(text if isinstance(text, str) else " ".join(map(str, text)), model, dim)
            value: Any = base64.b64encode(array("f", vector).tobytes()).decode() if encoding == "base64" else vector
            data.append({"object": "embedding", "index": i, "embedding": value})
        await self._wait(self._latency(0))
        payload = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": total, "total_tokens": total},
        }
        headers = lane.openai_headers(time.monotonic())
        headers["x-request-id"] = self._request_id("req_")
        return self._finish(payload, fault, headers)

    def _too_long(self, lane: Lane, info: ModelInfo, longest: int, total: int) -> NoReturn:
        headers = self._lane_headers(lane, False)
        if longest > info.context_window:
            message = (
                f"This model's maximum context length is {info.context_window} tokens, however you requested "
                f"{longest} tokens in one input. Please reduce your input."
            )
            raise _Reply(self._bad_request(message, False, "input", "context_length_exceeded", headers), "context")
        message = f"Requested {total} tokens, max {_MAX_EMBEDDING_TOKENS} tokens per request; send fewer inputs."
        raise _Reply(self._bad_request(message, False, "input", "max_tokens_per_request", headers), "context")

    def _embedding_inputs(self, raw: Any) -> list[str | list[int]]:
        if isinstance(raw, str):
            texts: list[Any] = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
            texts = [raw]
        elif isinstance(raw, list) and raw:
            texts = raw
        else:
            texts = []
        valid = all(
            (isinstance(t, str) and t) or (isinstance(t, list) and t and all(isinstance(x, int) for x in t))
            for t in texts
        )
        if not texts or not valid:
            message = "input must be a non-empty string or a non-empty array of non-empty strings or token arrays."
            raise _Reply(self._bad_request(message, False, "input"))
        if len(texts) > _MAX_EMBEDDING_INPUTS:
            message = f"input has {len(texts)} items; send at most {_MAX_EMBEDDING_INPUTS} per request."
            raise _Reply(self._bad_request(message, False, "input"))
        return texts

    def _models(self, request: web.BaseRequest, entry: LogEntry, anthropic: bool) -> web.Response:
        self._authenticate(request, entry, anthropic)
        wanted = request.path[len("/v1/models/") :] if request.path.startswith("/v1/models/") else None
        names = list(self.config.models) if wanted is None else [wanted]
        if wanted is not None and wanted not in self.config.models:
            entry.model = wanted
            if anthropic:
                return _anthropic_error(404, "not_found_error", f"model: {wanted}")
            message = f"The model `{wanted}` does not exist or you do not have access to it."
            return _openai_error(404, message, "invalid_request_error", "model_not_found")
        if anthropic:
            items = [{"type": "model", "id": n, "display_name": n, "created_at": "2025-01-01T00:00:00Z"} for n in names]
            payload: dict[str, Any] = (
                items[0] if wanted else {"data": items, "has_more": False, "first_id": names[0], "last_id": names[-1]}
            )
        else:
            items = [{"id": n, "object": "model", "created": 1_700_000_000, "owned_by": "backfill-sim"} for n in names]
            payload = items[0] if wanted else {"object": "list", "data": items}
        return web.Response(body=_dumps(payload), content_type=_JSON)

    # ---- Anthropic -----------------------------------------------------------------------------

    async def _messages(self, request: web.BaseRequest, entry: LogEntry) -> web.StreamResponse | None:
        body = await self._read_json(request, True)
        key, limits = self._authenticate(request, entry, True)
        model, info = self._model(body, entry, True, "chat")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise _Reply(self._bad_request("messages: at least one message is required.", True))
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise _Reply(self._bad_request("max_tokens: Field required (a positive integer).", True))
        if body.get("stream"):
            raise _Reply(
                self._bad_request("stream: the simulator does not stream; send the request without stream.", True)
            )
        now = time.monotonic()
        entry.t = now - self._t0
        digest = request_digest(body)
        entry.request_hash = digest.hex()
        system = body.get("system")
        counted = [{"role": "system", "content": content_text(system)}, *messages] if system else messages
        input_tokens = entry.prompt_tokens = count_messages(counted, model)
        lane = self._lane(key, model, limits, now)
        if input_tokens + max_tokens > info.context_window:
            message = (
                f"prompt is too long: {input_tokens} tokens + max_tokens {max_tokens} > {info.context_window} maximum"
            )
            raise _Reply(self._bad_request(message, True, headers=lane.anthropic_headers(now)), "context")
        self._gate(entry, limits, True, lane)
        refusal = lane.admit_anthropic(input_tokens, max_tokens, now)
        if refusal is not None:
            raise self._refused(refusal, model, True, lane.anthropic_headers(now))
        entry.admitted, entry.charged_tokens = True, input_tokens
        fault = self._faults.draw()
        try:
            await self._serve_fault(fault, request, entry, True, lane)
        except _Reply:
            lane.correct_output(max_tokens, 0, time.monotonic())
            raise
        answer = messages_answer(body, self._lengths, digest)
        if fault is Fault.TRUNCATE:
            answer = truncate(answer, model)
        entry.output_tokens = answer.output_tokens
        await self._wait(self._latency(answer.output_tokens))
        if answer.tool_name is None:
            block: dict[str, Any] = {"type": "text", "text": answer.text}
        else:
            block = {
                "type": "tool_use",
                "id": self._request_id("toolu_"),
                "name": answer.tool_name,
                "input": answer.data if answer.data is not None else {},
            }
        payload = {
            "id": self._request_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [block],
            "stop_reason": answer.anthropic_stop_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": answer.output_tokens},
        }
        done = time.monotonic()
        lane.correct_output(max_tokens, answer.output_tokens, done)
        headers = lane.anthropic_headers(done)
        headers["request-id"] = self._request_id("req_")
        return self._finish(payload, fault, headers)
