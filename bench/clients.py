"""One client run, in its own process: `python bench/clients.py CONFIG.json` runs one tool over the input
against the simulator, measures its own wall time, CPU and peak memory, and prints one BENCH_RESULT line.

The measured part runs from reading the input to the answers written to a parquet file; imports come
before it (their CPU is reported apart). A row is "ok" when it got an answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BARE, ClientConfig, ClientResult, use_uvloop

Answers = tuple[list[int], list[Any]]  # ids and their answers (None = no answer)


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _peak_rss_kb() -> int:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: Linux carries the parent's peak over fork
    and exec, so it would report the harness's memory as a floor."""
    with open("/proc/self/status", encoding="ascii") as f:
        hwm = next(line for line in f if line.startswith("VmHWM:"))
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(int(hwm.split()[1]), kids)


def _read(cfg: ClientConfig) -> tuple[list[int], list[str]]:
    table = pq.read_table(cfg.input)
    return table.column("id").to_pylist(), table.column("text").to_pylist()


def _write(cfg: ClientConfig, ids: list[int], answers: list[Any]) -> None:
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "answer": answers}), cfg.out)


def _write_check(cfg: ClientConfig, ids: list[int], ok: list[bool]) -> None:
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "ok": pa.array(ok, pa.bool_())}), cfg.check)


async def _gather_limited(n: int, cap: int, one: Callable[[int], Awaitable[Any]]) -> list[Any]:
    """What people write: one task per row, a semaphore for the concurrency cap."""
    sem = asyncio.Semaphore(cap)

    async def guarded(i: int) -> Any:
        async with sem:
            return await one(i)

    return await asyncio.gather(*(guarded(i) for i in range(n)))


def _batches(n: int, size: int) -> list[range]:
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


async def _scatter(ids: list[int], groups: list[range], vectors: list[list[Any] | None]) -> Answers:
    answers: list[Any] = [None] * len(ids)
    for group, got in zip(groups, vectors):
        if got is not None:
            for i, v in zip(group, got):
                answers[i] = v
    return ids, answers


# --- backfill ------------------------------------------------------------------------------------


def backfill_setup(cfg: ClientConfig) -> Callable[[], Awaitable[None]]:
    import backfill

    async def work() -> None:
        options: dict[str, Any] = dict(
            provider="sim",
            base_url=cfg.base_url,
            rpm=cfg.rpm,
            tpm=cfg.tpm,
            max_in_flight=cfg.max_in_flight,
            state_dir=cfg.state_dir,
            progress=False,
            return_type="path",  # the output stays on disk: reading it back would be the harness's memory
            id_column="id",
            output=cfg.out,
            chunk_size=cfg.chunk_size,
        )
        if cfg.kind == "embedding":
            options["kind"] = "embedding"
        else:
            options["params"] = {"max_tokens": cfg.max_tokens}
        # The sync entry point, as a script would call it: backfill runs its own loop (uvloop).
        await asyncio.to_thread(backfill.run, cfg.input, prompt="{{ text }}", model=cfg.model, **options)

    return work


def backfill_check(cfg: ClientConfig) -> None:
    table = pq.read_table(cfg.out, columns=["id", "status"])
    _write_check(cfg, table.column("id").to_pylist(), [s == "ok" for s in table.column("status").to_pylist()])


# --- the floor: aiohttp alone, no tool (workload 4's yardstick for CPU per request) ----------------


def bare_setup(cfg: ClientConfig) -> Callable[[], Awaitable[Answers]]:
    """The least a client can do per request: a fixed pool of tasks over one aiohttp session,
    orjson both ways, no retries (the sim of workload 4 has no faults and no limits)."""
    import aiohttp
    import orjson

    async def work() -> Answers:
        ids, texts = _read(cfg)
        answers: list[Any] = [None] * len(ids)
        url = cfg.base_url.rstrip("/") + "/chat/completions"
        headers = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}
        rows = iter(range(len(ids)))  # shared by the pool: each task takes the next row
        connector = aiohttp.TCPConnector(limit=cfg.max_in_flight)
        async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

            async def worker() -> None:
                for i in rows:
                    body = {"model": cfg.model, "messages": [{"role": "user", "content": texts[i]}], "max_tokens": cfg.max_tokens}
                    async with session.post(url, data=orjson.dumps(body)) as r:
                        raw = await r.read()
                        if r.status == 200:
                            answers[i] = orjson.loads(raw)["choices"][0]["message"]["content"]

            await asyncio.gather(*(worker() for _ in range(min(cfg.max_in_flight, len(ids)))))
        return ids, answers

    return work


# --- the naive approach: AsyncOpenAI + a semaphore + the SDK's retries -----------------------------


def naive_setup(cfg: ClientConfig) -> Callable[[], Awaitable[Answers]]:
    import openai

    async def work() -> Answers:
        ids, texts = _read(cfg)
        client = openai.AsyncOpenAI(base_url=cfg.base_url, api_key="sk-bench", max_retries=10)
        if cfg.kind == "embedding":
            groups = _batches(len(ids), cfg.embed_batch)

            async def embed(g: int) -> list[Any] | None:
                try:
                    r = await client.embeddings.create(model=cfg.model, input=[texts[i] for i in groups[g]])
                    return [d.embedding for d in r.data]
                except openai.APIError:
                    return None

            vectors = await _gather_limited(len(groups), cfg.max_in_flight, embed)
            await client.close()
            return await _scatter(ids, groups, vectors)

        async def one(i: int) -> str | None:
            try:
                r = await client.chat.completions.create(
                    model=cfg.model, messages=[{"role": "user", "content": texts[i]}], max_tokens=cfg.max_tokens
                )
                return r.choices[0].message.content
            except openai.APIError:
                return None

        answers = await _gather_limited(len(ids), cfg.max_in_flight, one)
        await client.close()
        return ids, answers

    return work


# --- LiteLLM: a Router with rpm/tpm on the deployment (usage-based routing, pre-call checks) -------


def litellm_setup(cfg: ClientConfig) -> Callable[[], Awaitable[Answers]]:
    import logging

    import litellm
    from litellm import Router

    litellm.suppress_debug_info = True
    logging.getLogger("LiteLLM").setLevel(logging.CRITICAL)
    logging.getLogger("LiteLLM Router").setLevel(logging.CRITICAL)
    params: dict[str, Any] = {"model": f"openai/{cfg.model}", "api_base": cfg.base_url, "api_key": "sk-bench"}
    limited = cfg.rpm is not None or cfg.tpm is not None
    if cfg.rpm is not None:
        params["rpm"] = int(cfg.rpm)
    if cfg.tpm is not None:
        params["tpm"] = int(cfg.tpm)
    router = Router(
        model_list=[{"model_name": "bench", "litellm_params": params}],
        routing_strategy="usage-based-routing-v2" if limited else "simple-shuffle",
        enable_pre_call_checks=limited,
        num_retries=10,
    )

    async def work() -> Answers:
        ids, texts = _read(cfg)
        if cfg.kind == "embedding":
            groups = _batches(len(ids), cfg.embed_batch)

            async def embed(g: int) -> list[Any] | None:
                try:
                    # Without it LiteLLM sends an encoding_format the API refuses (400).
                    r = await router.aembedding(model="bench", input=[texts[i] for i in groups[g]], encoding_format="float")
                    return [d["embedding"] for d in r.data]
                except Exception:  # noqa: BLE001 — any failure is a lost batch, counted by the harness
                    return None

            return await _scatter(ids, groups, await _gather_limited(len(groups), cfg.max_in_flight, embed))

        async def one(i: int) -> str | None:
            try:
                r = await router.acompletion(
                    model="bench", messages=[{"role": "user", "content": texts[i]}], max_tokens=cfg.max_tokens
                )
                return r.choices[0].message.content
            except Exception:  # noqa: BLE001 — any failure is a lost row, counted by the harness
                return None

        return ids, await _gather_limited(len(ids), cfg.max_in_flight, one)

    return work


# --- Curator: online mode, limits set, its cache in a fresh directory per run ---------------------


def curator_setup(cfg: ClientConfig) -> Callable[[], Awaitable[Answers]]:
    if cfg.kind == "embedding":
        raise NotImplementedError("Curator has no embeddings endpoint (curator.LLM is chat only).")
    from bespokelabs import curator

    class Ask(curator.LLM):
        def prompt(self, row: dict[str, Any]) -> str:
            return row["text"]

        def parse(self, row: dict[str, Any], response: str) -> dict[str, Any]:
            return {"id": row["id"], "answer": response}

    backend: dict[str, Any] = {
        "base_url": cfg.base_url,
        "api_key": "sk-bench",
        "max_retries": 10,
        "require_all_responses": False,
        "max_concurrent_requests": cfg.max_in_flight,
        # max_tokens ends most answers with finish_reason "length"; that is an answer here, not a failure.
        "invalid_finish_reasons": ["content_filter"],
    }
    if cfg.rpm is not None:
        backend["max_requests_per_minute"] = int(cfg.rpm)
    if cfg.tpm is not None:
        backend["max_tokens_per_minute"] = int(cfg.tpm)
    llm = Ask(model_name=cfg.model, backend="openai", generation_params={"max_tokens": cfg.max_tokens}, backend_params=backend)

    async def work() -> Answers:
        ids, texts = _read(cfg)
        rows = [{"id": i, "text": t} for i, t in zip(ids, texts)]
        # Curator runs its own event loop; keep it off ours.
        response = await asyncio.to_thread(llm, rows)
        got = {r["id"]: r["answer"] for r in response.dataset}
        answers = [got.get(i) for i in ids]
        return ids, answers

    return work


SETUPS: dict[str, Callable[[ClientConfig], Callable[[], Awaitable[Any]]]] = {
    "backfill": backfill_setup,
    "naive": naive_setup,
    "litellm": litellm_setup,
    "curator": curator_setup,
    BARE: bare_setup,
}


def main() -> None:
    use_uvloop()  # before any tool is imported or set up: some make their loops early
    cfg = ClientConfig(**json.loads(Path(sys.argv[1]).read_text()))
    if cfg.tool == "curator":
        os.environ["CURATOR_CACHE_DIR"] = cfg.state_dir
        # Curator counts tokens with tiktoken, which would download its tables; LiteLLM ships them.
        import litellm.litellm_core_utils.default_encoding  # noqa: F401  (sets TIKTOKEN_CACHE_DIR)
    result = ClientResult(cfg.tool)
    try:
        work = SETUPS[cfg.tool](cfg)
    except (ImportError, NotImplementedError) as e:
        result.ok, result.why = False, str(e).splitlines()[0][:200]
        print("BENCH_RESULT " + json.dumps(asdict(result)), flush=True)
        return
    result.import_cpu_s = _cpu()
    t0, c0 = time.perf_counter(), _cpu()
    answers = asyncio.run(work())
    if answers is not None:
        _write(cfg, *answers)
    result.wall_s = time.perf_counter() - t0
    result.cpu_s = _cpu() - c0
    # Before the check: reading the output back for the harness is not the tool's memory.
    result.peak_rss_mb = _peak_rss_kb() / 1024
    if answers is None:
        backfill_check(cfg)
    else:
        ids, values = answers
        _write_check(cfg, ids, [v is not None for v in values])
    print("BENCH_RESULT " + json.dumps(asdict(result)), flush=True)


if __name__ == "__main__":
    main()
