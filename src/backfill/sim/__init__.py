"""backfill.sim: a local server speaking the OpenAI and Anthropic protocols with the providers' limits,
latency, faults and deterministic answers — for tests, benchmarks, the quickstart and rehearsals."""

from backfill.sim.answers import Answer, Lengths, chat_answer, embedding_vector, messages_answer, request_hash
from backfill.sim.config import Faults, KeyLimits, ModelInfo, Outage, SimConfig, builtin_sim_config, default_models
from backfill.sim.log import LogEntry, RequestLog, WindowCount, read_jsonl
from backfill.sim.server import Simulator

__all__ = [
    "Answer",
    "Faults",
    "KeyLimits",
    "Lengths",
    "LogEntry",
    "ModelInfo",
    "Outage",
    "RequestLog",
    "SimConfig",
    "Simulator",
    "WindowCount",
    "builtin_sim_config",
    "chat_answer",
    "default_models",
    "embedding_vector",
    "messages_answer",
    "read_jsonl",
    "request_hash",
]
