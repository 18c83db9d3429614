"""The provider adapter contract and what every adapter shares: one aiohttp session, posting JSON,
and classifying each failure by status code and error code/type (never by message text)."""

from __future__ import annotations

import abc
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any, ClassVar, Self
from urllib.parse import urlsplit

import aiohttp
import orjson
from yarl import URL

from backfill.errors import SpecError
from backfill.providers.headers import parse_retry_after
from backfill.providers.structured import ModeState, StructuredMode
from backfill.request import Outcome, OutcomeKind, RateLimitInfo, Request

# Transient by nature: timeouts, conflicts, server errors, Anthropic's 529 "overloaded".
RETRY_STATUSES = frozenset({408, 409, 500, 502, 503, 504, 529})
_MAX_MESSAGE = 300


@dataclass(slots=True)
class Reply:
    """An HTTP response that arrived."""

    status: int
    headers: Mapping[str, str]
    body: bytes


@dataclass(slots=True)
class ErrorFields:
    """The parts of an error body that classification may look at (code, type) or show (message)."""

    code: str | None
    type: str | None
    message: str


def _out_of_quota(status: int, err: ErrorFields) -> bool:
    """The account's quota or credit is exhausted: fatal, and the job stops with cause `quota`."""
    return err.type == "billing_error" or "insufficient_quota" in (err.code, err.type) or status == 402


def dumps(obj: Any) -> bytes:
    # orjson: encoding and decoding are a measurable share of a request's CPU with the stdlib.
    # Non-string keys as json.dumps writes them: a Python caller's logit_bias={50256: -100}.
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)


def _trim(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"


# A key as providers echo it masked: a visible head and/or tail around dots or stars (sk-...abcd, sk-proj-****wxyz).
_MASKED = re.compile(r"[\w-]*(?:\.{3}|\u2026|\*{3,})[\w-]*")
_KEY_RUN = 8  # a run of this many of the key's characters in a row is part of the key


def scrub_key(text: str, key: str | None) -> str:
    """The text without the key: whole, any run of 8 or more of its characters, or a masked form that
    shows its start or end."""
    if not key or not text:
        return text
    runs = {key[i : i + _KEY_RUN] for i in range(len(key) - _KEY_RUN + 1)} if len(key) >= _KEY_RUN else {key}
    width = min(_KEY_RUN, len(key))
    hidden = bytearray(len(text))
    for j in range(len(text) - width + 1):
        if text[j : j + width] in runs:
            hidden[j : j + width] = b"\x01" * width
    out, j = [], 0
    while j < len(text):
        if hidden[j]:
            while j < len(text) and hidden[j]:
                j += 1
            out.append("***")
        else:
            out.append(text[j])
            j += 1

    def masked(m: re.Match[str]) -> str:
        head, _, tail = re.split(r"(\.{3}|\u2026|\*{3,})", m.group(0), maxsplit=1)
        shows_key = (len(head) >= 3 and key.startswith(head)) or (len(tail) >= 2 and key.endswith(tail))
        return "***" if shows_key else m.group(0)

    return _MASKED.sub(masked, "".join(out))


def error_fields(body: bytes) -> ErrorFields:
    """OpenAI/Anthropic `{"error": {...}}`, vLLM's top-level fields, Ollama's `{"error": "..."}`, or plain text.

    The message is untrimmed so that the key is blanked out before it is shortened."""
    try:
        data = orjson.loads(body)
    except ValueError:
        return ErrorFields(None, None, body.decode("utf-8", "replace"))
    if not isinstance(data, dict):
        return ErrorFields(None, None, "")
    err = data.get("error", data)
    if isinstance(err, str):
        return ErrorFields(None, None, err)
    if not isinstance(err, dict):
        err = data
    code, kind, message = err.get("code"), err.get("type"), err.get("message")
    return ErrorFields(
        code if isinstance(code, str) else None,
        kind if isinstance(kind, str) else None,
        message if isinstance(message, str) else "",
    )


def _host(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


def without_userinfo(url: str) -> str:
    """A URL fit for an error message: credentials in `user:pass@` are dropped."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "the configured base URL"
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()


class Provider(abc.ABC):
    """One wire protocol. Builds the HTTP request, reads usage and rate-limit headers, classifies failures.

    Its class carries the facts the engine plans with, so the engine never compares provider names:
    the key variable and whether a key or a price is needed, embeddings, default parameters, and the
    structured-output modes it can fall back through."""

    name: ClassVar[str]
    default_base_url: ClassVar[str | None] = None
    max_embedding_inputs: ClassVar[int] = 2048  # per-request limits for packing rows into one embedding call
    max_embedding_tokens: ClassVar[int] = 300_000
    protocol_headers: ClassVar[Mapping[str, str]] = {}
    key_env: ClassVar[str | None] = None  # the environment variable the key is read from by default
    needs_key: ClassVar[bool] = True  # at the provider's own cloud; see needs_key_for
    # Host names (or, starting with a dot, domain suffixes) of the provider's own cloud: there a key
    # and a known price are needed; a base URL elsewhere is a compatible server that may need neither.
    cloud_hosts: ClassVar[tuple[str, ...]] = ()
    supports_embeddings: ClassVar[bool] = True
    default_params: ClassVar[Mapping[str, Any]] = MappingProxyType({})  # what a request carries unless the job sets it
    structured_modes: ClassVar[tuple[StructuredMode, ...]] = ()  # first is the default; empty: takes no schema
    starts_simulator: ClassVar[bool] = False  # without a base URL, open_provider starts the built-in simulator

    @classmethod
    def on_cloud(cls, base_url: str | None) -> bool:
        """Whether requests go to the provider's own cloud (no base URL, or one on its hosts)."""
        if base_url is None:
            return True
        host = _host(base_url)
        return any(host.endswith(h) if h.startswith(".") else host == h for h in cls.cloud_hosts)

    @classmethod
    def needs_key_for(cls, base_url: str | None) -> bool:
        """Whether a job at `base_url` must have an API key (else it runs without one if none is set)."""
        return cls.needs_key

    @classmethod
    def needs_price(cls, base_url: str | None) -> bool:
        """Whether a job at `base_url` needs a known model price: a cloud API bills; a server elsewhere may not."""
        return cls.on_cloud(base_url)

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None,
        timeout_s: float = 60.0,
        max_connections: int = 256,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        base = (base_url or self.default_base_url or "").rstrip("/")
        if not base:
            raise SpecError(f"The {self.name} provider needs a base URL; set task.base_url.")
        self.base_url = base
        self.timeout_s = timeout_s
        self._api_key = api_key or None
        self._max_connections = max_connections
        auth = self._auth_headers(self._api_key) if self._api_key else {}
        self._headers = {"Content-Type": "application/json", **self.protocol_headers, **auth, **(headers or {})}
        self._session: aiohttp.ClientSession | None = None
        self._modes = ModeState(self.structured_modes)
        # Parsed once per endpoint: aiohttp would parse the string again for every request.
        self._urls: dict[str, URL] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lane_id={self.lane_id!r})"

    @abc.abstractmethod
    def _auth_headers(self, api_key: str) -> dict[str, str]: ...

    @abc.abstractmethod
    async def complete(self, request: Request) -> Outcome:
        """Send one chat request and classify what came back."""

    @abc.abstractmethod
    async def embed(self, requests: list[Request]) -> Outcome:
        """Send one packed embedding call; the embeddings come back in the order of `requests`."""

    @property
    def lane_id(self) -> str:
        """Endpoint and key fingerprint; the engine appends the model."""
        fingerprint = hashlib.sha256(self._api_key.encode()).hexdigest()[:8] if self._api_key else "nokey"
        return f"{self.name}|{self.base_url}|{fingerprint}"

    @property
    def refunds_output_tokens(self) -> bool:
        """Whether the provider corrects its max_tokens reservation to the actual output."""
        return False

    @property
    def structured_mode(self) -> StructuredMode | None:
        """The mode schema requests go out in now; it moves on when the server refuses one."""
        return self._modes.current

    def use_structured_mode(self, mode: StructuredMode | str) -> None:
        """Send schema requests in `mode` from now on (one remembered for this endpoint and model)."""
        self._modes.restore(mode)

    async def open(self) -> None:
        self._ensure_session()

    def _ensure_session(self) -> aiohttp.ClientSession:
        """One session for all requests: pooled keep-alive connections, auth headers set once."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=30.0),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                headers=self._headers,
                # APIs set no cookies worth keeping; the jar's per-request bookkeeping is measurable.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _post(self, url: str, body: dict[str, Any]) -> Reply | Outcome:
        """POST JSON; a failure before a response arrived comes back as an Outcome."""
        session = self._session or self._ensure_session()
        try:
            async with session.post(self._urls.get(url) or self._parse_url(url), data=dumps(body)) as resp:
                return Reply(resp.status, resp.headers, await resp.read())
        except TimeoutError:
            return Outcome(
                OutcomeKind.RETRY,
                error=f"{self.name} did not answer within {self.timeout_s:g} s; the request will be retried.",
            )
        except aiohttp.InvalidURL:
            return Outcome(
                OutcomeKind.FATAL, error=f"The {self.name} base URL is not a valid URL; check task.base_url."
            )
        except (aiohttp.ClientError, OSError) as exc:
            return Outcome(
                OutcomeKind.RETRY,
                error=f"The connection to {self.name} failed ({type(exc).__name__}); the request will be retried.",
            )

    def _parse_url(self, url: str) -> URL:
        try:
            parsed = self._urls[url] = URL(url)
        except ValueError as e:
            raise aiohttp.InvalidURL(url) from e
        return parsed

    def _scrub(self, text: str) -> str:
        return scrub_key(text, self._api_key)

    def _malformed(self, reply: Reply) -> Outcome:
        return Outcome(
            OutcomeKind.RETRY,
            status=reply.status,
            error=f"{self.name} sent a malformed response ({reply.status}); the request will be retried.",
        )

    def _oversized(self, rate: RateLimitInfo, request: Request) -> str | None:
        """Which per-minute limit this one request alone exceeds, if any."""
        return None

    def _no_wait_cures(self, outcome: Outcome, request: Request) -> Outcome:
        """A 429 for a request larger than a per-minute limit would come back forever: it is a bad row.
        Judged from the limit headers and the request's own token counts, not the message text."""
        if outcome.kind is OutcomeKind.RATE_LIMITED and outcome.rate is not None:
            why = self._oversized(outcome.rate, request)
            if why is not None:
                outcome.kind = OutcomeKind.BAD_ROW
                outcome.error = (
                    f"This row's request is too large for the rate limit ({why}); shorten it or lower max_tokens."
                )
        return outcome

    def _failure(self, reply: Reply, model: str) -> Outcome:
        """Classify a non-2xx reply."""
        err = error_fields(reply.body)
        kind, error = self._classify(reply.status, err, model)
        return Outcome(
            kind, status=reply.status, error=error, retry_after=parse_retry_after(reply.headers),
            quota=_out_of_quota(reply.status, err), code=err.code or err.type,
        )

    def _classify(self, status: int, err: ErrorFields, model: str) -> tuple[OutcomeKind, str]:
        name = self.name
        detail = f": {_trim(self._scrub(err.message))}" if err.message.strip() else ""
        if _out_of_quota(status, err):
            return OutcomeKind.FATAL, (
                f"The {name} account's quota or credit is exhausted ({status}); add credit or raise the limit, then resume."
            )
        if status == 429:
            return OutcomeKind.RATE_LIMITED, f"{name} rate limit reached (429)."
        if status in RETRY_STATUSES or status >= 500:
            return OutcomeKind.RETRY, f"{name} answered {status}; the request will be retried."
        if status == 401:
            if self._api_key is None:
                return OutcomeKind.FATAL, f"{name} requires an API key (401) and none was given."
            return OutcomeKind.FATAL, f"The API key was rejected by {name} (401)."
        if status == 403:
            return OutcomeKind.FATAL, f"{name} refused access with this API key (403){detail}"
        if status == 404 or err.code == "model_not_found":
            return OutcomeKind.FATAL, f"{name} does not know the model '{model}' or the endpoint ({status}){detail}"
        return OutcomeKind.BAD_ROW, f"{name} rejected this row's request ({status}){detail}"
