"""Configuration of the simulator: keys and their limits, models, latency, faults and outages.

Everything is a plain dataclass so that tests, the CLI and the quickstart build one in a line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ModelKind = Literal["chat", "embedding"]
# The statuses servers refuse an unsupported response_format with: OpenAI-style 400, FastAPI's 422,
# and 500 from servers that fail inside validation.
REJECT_STATUSES = (400, 422, 500)


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """Per-minute limits of one API key (per model, as the providers apply them). None = unlimited.

    OpenAI endpoints use `rpm` and `tpm`; Anthropic uses `rpm`, `input_tpm` and `output_tpm`.
    `quota_exhausted` makes every request of the key fail as an account out of credit would.
    """

    rpm: float | None = None
    tpm: float | None = None
    input_tpm: float | None = None
    output_tpm: float | None = None
    quota_exhausted: bool = False


@dataclass(frozen=True, slots=True)
class ModelInfo:
    context_window: int = 128_000
    kind: ModelKind = "chat"


def model_info_for(name: str, context_window: int | None = None) -> ModelInfo:
    """A model's info guessed from its name: `embed` in the name makes an embedding model."""
    kind: ModelKind = "embedding" if "embed" in name else "chat"
    default_window = 8192 if kind == "embedding" else 200_000 if name.startswith("claude") else 128_000
    return ModelInfo(context_window=context_window or default_window, kind=kind)


def default_models() -> dict[str, ModelInfo]:
    return {
        "gpt-4o-mini": ModelInfo(128_000),
        "gpt-4o": ModelInfo(128_000),
        "gpt-4.1-mini": ModelInfo(1_047_576),
        "gpt-4.1-nano": ModelInfo(1_047_576),
        "gpt-4.1": ModelInfo(1_047_576),
        "o4-mini": ModelInfo(200_000),
        "text-embedding-3-small": ModelInfo(8192, "embedding"),
        "text-embedding-3-large": ModelInfo(8192, "embedding"),
        "claude-3-5-haiku-latest": ModelInfo(200_000),
        "claude-haiku-4-5": ModelInfo(200_000),
        "claude-sonnet-4-5": ModelInfo(200_000),
        "claude-opus-4-1": ModelInfo(200_000),
        "sim-chat": ModelInfo(128_000),
        "sim-embed": ModelInfo(8192, "embedding"),
    }


@dataclass(frozen=True, slots=True)
class Faults:
    """Probabilities (0..1) that an admitted request meets each fault; they must sum to at most 1.

    `error_529` is sent as 529 `overloaded_error` on Anthropic endpoints and as 503 on OpenAI ones
    (OpenAI never sends 529). A hang holds the request for `hang_s` and then answers normally.
    """

    error_500: float = 0.0
    error_503: float = 0.0
    error_529: float = 0.0
    hang: float = 0.0
    hang_s: float = 30.0
    reset: float = 0.0
    malformed: float = 0.0
    truncate: float = 0.0

    def total(self) -> float:
        return (
            self.error_500 + self.error_503 + self.error_529 + self.hang + self.reset + self.malformed + self.truncate
        )


@dataclass(frozen=True, slots=True)
class Outage:
    """Every request that arrives from `start_s` to `end_s` (seconds after the sim started) gets `status`."""

    start_s: float
    end_s: float
    status: int = 503

    @classmethod
    def parse(cls, text: str) -> Outage:
        """Parse `START:END:STATUS` (STATUS optional, default 503), e.g. `30:40:429`."""
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"Outage {text!r} is not START:END:STATUS; write it like 30:40:429.")
        try:
            start, end = float(parts[0]), float(parts[1])
            status = int(parts[2]) if len(parts) == 3 else 503
        except ValueError:
            raise ValueError(
                f"Outage {text!r} is not START:END:STATUS with numbers; write it like 30:40:429."
            ) from None
        if end <= start or status not in (429, 500, 503, 529):
            raise ValueError(f"Outage {text!r} needs END after START and STATUS one of 429, 500, 503, 529.")
        return cls(start, end, status)


@dataclass(slots=True)
class SimConfig:
    """The whole simulator.

    keys: API key -> its limits; empty = accept any key (or none), each distinct key getting
        `default_limits`.
    burst_s: each limit's bucket holds `limit × burst_s / 60` (see `backfill.sim.ratelimit`).
    latency_s: mean time to answer a request of `output_tokens_mean` tokens, of which `ttft_s` is the
        time to the first token; the rest scales with the output length. Each request's latency is
        multiplied by a lognormal factor of mean 1 and spread `latency_sigma`. 0 = answer at once.
    output_tokens_mean, output_tokens_sigma: lognormal length of text answers, capped by max_tokens.
    max_concurrency: requests served at once; the rest queue (like a self-hosted server). None = no cap.
    default_max_tokens: what an OpenAI request without max_tokens is charged for its output.
    reject_json_schema, reject_json_object: answer a chat request whose `response_format.type` is
        `json_schema` (resp. `json_object`, with or without a schema) with this status (400, 422 or
        500) and the error body such servers send, as servers without that mode do. None = accept it.
    log_path: append every request to this JSONL file. log_in_memory: also keep entries in `sim.log`
        (turn off for long rehearsals; a million entries take a few hundred MB).
    """

    keys: dict[str, KeyLimits] = field(default_factory=dict)
    default_limits: KeyLimits = field(default_factory=KeyLimits)
    burst_s: float = 1.0
    models: dict[str, ModelInfo] = field(default_factory=default_models)
    latency_s: float = 0.0
    ttft_s: float = 0.0
    latency_sigma: float = 0.5
    output_tokens_mean: float = 64.0
    output_tokens_sigma: float = 0.5
    max_concurrency: int | None = None
    default_max_tokens: int = 4096
    reject_json_schema: int | None = None
    reject_json_object: int | None = None
    faults: Faults = field(default_factory=Faults)
    outages: list[Outage] = field(default_factory=list)
    embedding_dim: int = 64
    seed: int = 0
    log_path: Path | None = None
    log_in_memory: bool = True

    def __post_init__(self) -> None:
        if self.faults.total() > 1.0 + 1e-9:
            raise ValueError("The fault rates add up to more than 1; lower them so that some requests succeed.")
        if self.burst_s <= 0:
            raise ValueError("burst_s must be positive; 1 second is what the providers allow.")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1, or None for no cap.")
        if self.ttft_s > self.latency_s and self.latency_s > 0:
            raise ValueError("ttft_s is part of latency_s, so it cannot be larger; raise latency_s or lower ttft_s.")
        for status in (self.reject_json_schema, self.reject_json_object):
            if status is not None and status not in REJECT_STATUSES:
                raise ValueError(f"A response_format is rejected with 400, 422 or 500, not {status}; pick one of those.")


def builtin_sim_config() -> SimConfig:
    """The simulator the quickstart runs on: limits like a modest paid tier, short latency."""
    return SimConfig(
        default_limits=KeyLimits(rpm=3000, tpm=2_000_000), latency_s=0.3, latency_sigma=0.3, log_in_memory=False
    )
