"""`backfill sim` / `python -m backfill.sim`: run the simulator from the command line until Ctrl-C."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Annotated

import typer

from backfill import loop
from backfill.sim.config import Faults, KeyLimits, ModelInfo, Outage, SimConfig, model_info_for
from backfill.sim.server import Simulator


def _models(spec: str) -> dict[str, ModelInfo]:
    """`a,b:32000` -> models a (default window) and b (32k window)."""
    models: dict[str, ModelInfo] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, window = item.partition(":")
        if window and not window.isdigit():
            raise typer.BadParameter(f"Model {item!r} should be NAME or NAME:CONTEXT_WINDOW, e.g. sim-chat:32000.")
        models[name] = model_info_for(name, int(window) if window else None)
    if not models:
        raise typer.BadParameter("--models needs at least one model name, e.g. --models gpt-4o-mini,sim-embed.")
    return models


def sim_command(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on; 0 picks a free one.")] = 8765,
    key: Annotated[
        list[str] | None, typer.Option("--key", help="An API key to accept (repeatable).", show_default="accept any key")
    ] = None,
    rpm: Annotated[float | None, typer.Option(help="Requests per minute per key and model.", show_default="no limit")] = None,
    tpm: Annotated[float | None, typer.Option(help="OpenAI tokens per minute (prompt + max_tokens).", show_default="no limit")] = None,
    input_tpm: Annotated[float | None, typer.Option(help="Anthropic input tokens per minute.", show_default="no limit")] = None,
    output_tpm: Annotated[float | None, typer.Option(help="Anthropic output tokens per minute.", show_default="no limit")] = None,
    burst_s: Annotated[float, typer.Option(help="Seconds of each limit that may be spent at once.")] = 1.0,
    latency: Annotated[float, typer.Option(help="Mean seconds to answer a request of mean output length.")] = 0.0,
    latency_sigma: Annotated[float, typer.Option(help="Lognormal spread of the latency.")] = 0.5,
    ttft: Annotated[float, typer.Option(help="Mean seconds to the first token (part of --latency).")] = 0.0,
    output_tokens: Annotated[float, typer.Option(help="Mean output tokens of a text answer.")] = 64.0,
    max_concurrency: Annotated[int | None, typer.Option(help="Requests served at once; the rest queue.", show_default="no limit")] = None,
    error_rate_500: Annotated[float, typer.Option(help="Fraction of requests answered 500.")] = 0.0,
    error_rate_503: Annotated[float, typer.Option(help="Fraction of requests answered 503.")] = 0.0,
    error_rate_529: Annotated[
        float, typer.Option(help="Fraction answered 529 overloaded (503 on OpenAI paths).")
    ] = 0.0,
    hang_rate: Annotated[float, typer.Option(help="Fraction of requests held for --hang-s before answering.")] = 0.0,
    hang_s: Annotated[float, typer.Option(help="Seconds a hanging request is held.")] = 30.0,
    reset_rate: Annotated[float, typer.Option(help="Fraction of connections closed without a response.")] = 0.0,
    malformed_rate: Annotated[float, typer.Option(help="Fraction of 200 answers with a broken JSON body.")] = 0.0,
    truncate_rate: Annotated[float, typer.Option(help="Fraction of answers cut short (finish_reason length).")] = 0.0,
    quota_exhausted: Annotated[
        bool, typer.Option(help="Refuse every request as out of quota (insufficient_quota).")
    ] = False,
    outage: Annotated[
        list[str] | None, typer.Option(help="Refuse every request with STATUS from START to END seconds after start, written like 30:40:429 (repeatable).", show_default="none")
    ] = None,
    reject_json_schema: Annotated[
        int | None,
        typer.Option(help="Refuse response_format json_schema with this status (400, 422 or 500), as servers without it do.", show_default="accepted"),
    ] = None,
    reject_json_object: Annotated[
        int | None,
        typer.Option(help="Refuse response_format json_object (with or without a schema) with this status (400, 422 or 500).", show_default="accepted"),
    ] = None,
    models: Annotated[
        str | None, typer.Option(help="Comma-separated models to serve, NAME or NAME:CONTEXT_WINDOW.", show_default="any model")
    ] = None,
    embedding_dim: Annotated[int, typer.Option(help="Default embedding dimension.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the fault and latency draws.")] = 0,
    log: Annotated[Path | None, typer.Option("--log", help="Append every request to this JSONL file.", show_default="no log")] = None,
) -> None:
    """Run a local OpenAI- and Anthropic-compatible server with rate limits, latency and faults."""
    limits = KeyLimits(rpm=rpm, tpm=tpm, input_tpm=input_tpm, output_tpm=output_tpm, quota_exhausted=quota_exhausted)
    try:
        config = SimConfig(
            keys={k: limits for k in key or []},
            default_limits=limits,
            burst_s=burst_s,
            latency_s=latency,
            latency_sigma=latency_sigma,
            ttft_s=ttft,
            output_tokens_mean=output_tokens,
            max_concurrency=max_concurrency,
            reject_json_schema=reject_json_schema,
            reject_json_object=reject_json_object,
            faults=Faults(
                error_500=error_rate_500,
                error_503=error_rate_503,
                error_529=error_rate_529,
                hang=hang_rate,
                hang_s=hang_s,
                reset=reset_rate,
                malformed=malformed_rate,
                truncate=truncate_rate,
            ),
            outages=[Outage.parse(o) for o in outage or []],
            embedding_dim=embedding_dim,
            seed=seed,
            log_path=log,
            log_in_memory=False,  # nobody reads it in a CLI run; --log is the record
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if models is not None:
        config.models = _models(models)
    loop.run(_serve(Simulator(config, host=host, port=port)))


async def _serve(sim: Simulator) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await sim.start()
    except OSError as exc:
        raise typer.BadParameter(
            f"Cannot listen on {sim.host}:{sim.port} ({exc.strerror}); pick another --port."
        ) from None
    typer.echo(f"backfill sim listening on {sim.url} (OpenAI base URL {sim.base_url}); Ctrl-C to stop", err=False)
    try:
        await stop.wait()
    finally:
        await sim.close()
