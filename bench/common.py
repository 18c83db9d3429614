"""What every workload shares: the simulator in its own process, generated inputs, one client run in a
measured subprocess, the exactly-once check of its output, the sim log's counts, and the tables."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
TOOLS = ("backfill", "naive", "litellm", "curator")
# The floor every client's CPU per request is held against (workload 4): aiohttp alone, no tool.
BARE = "aiohttp"
# The sim's buckets hold this many seconds of each limit (its default), and start full.
SIM_BURST_S = 1.0
MAX_IN_FLIGHT = 256
# Told no limits, Curator applies its own default of 200 requests/min: where the sim has none, it is
# told these, far above reach (and 1000× that in tokens).
CURATOR_UNBOUNDED_RPM = 100_000_000

# Plain English words of one cl100k token each (with their leading space), so a prompt of n words
# counts close to n tokens and every row is a different request.
_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have "
    "an they you were her she there one all we their has been if more when will would who so no out up "
    "into do than can time only some could new them man other these may first then any like my now over "
    "such our even most made after also did many off before must well back through years much where your "
    "way down should because each just those people how too little state good very make world still see "
    "own men work long here get both between life being under never day same another know while last "
    "might us great old year since come part"
).split()


@dataclass
class ClientConfig:
    """One client run: what the client subprocess (bench/clients.py) is told."""

    tool: str
    input: str  # parquet with columns id (int64) and text
    out: str  # the client's output file
    check: str  # id + ok, written after the measured part for the harness's check
    base_url: str
    model: str = "gpt-4o-mini"
    kind: str = "chat"
    rpm: float | None = None
    tpm: float | None = None
    max_tokens: int = 50
    max_in_flight: int = MAX_IN_FLIGHT
    chunk_size: int = 500
    state_dir: str = ""  # backfill's ledger, curator's cache
    embed_batch: int = 2048  # inputs per embedding request for the competitors


@dataclass
class ClientResult:
    """What a client subprocess measured about itself, and what the harness checked."""

    tool: str
    ok: bool = True
    why: str = ""  # why it did not run or did not finish
    wall_s: float = 0.0  # from reading the input to the output written
    cpu_s: float = 0.0  # user + system of the process (and its children) over wall_s
    import_cpu_s: float = 0.0  # the interpreter and the tool's imports, before wall_s
    peak_rss_mb: float = 0.0
    rows: int = 0
    rows_ok: int = 0
    missing: int = 0
    duplicated: int = 0
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class SimCounts:
    """What the simulator's request log says about one client run."""

    requests: int
    ok: int
    rate_limited: int
    resent: int  # 200 answers to a request hash that had already been answered
    first_s: float
    last_s: float


# --- inputs ------------------------------------------------------------------------------------


def make_input(path: Path, rows: int, words: int, seed: int = 7) -> Path:
    """A parquet of `rows` distinct prompts of about `words` tokens, with an int64 id column."""
    rng = random.Random(seed)
    batch = 50_000
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    with pq.ParquetWriter(path, schema) as w:
        for start in range(0, rows, batch):
            n = min(batch, rows - start)
            ids = list(range(start, start + n))
            texts = [f"Row {i}: " + " ".join(rng.choices(_WORDS, k=words)) for i in ids]
            w.write_table(pa.table({"id": ids, "text": texts}, schema=schema))
    return path


# --- the simulator -----------------------------------------------------------------------------


@dataclass
class Sim:
    base_url: str
    log: Path | None
    proc: subprocess.Popen[str]


@contextmanager
def sim(
    workdir: Path,
    *,
    rpm: float | None = None,
    tpm: float | None = None,
    latency: float = 0.0,
    output_tokens: int = 50,
    log: bool = True,
    name: str = "sim",
) -> Iterator[Sim]:
    """A fresh simulator process (full buckets, empty log) on a free port."""
    log_path = workdir / f"{name}.jsonl" if log else None
    if log_path is not None:
        log_path.unlink(missing_ok=True)  # the sim appends; a rerun must not count the last run's requests
    cmd = [sys.executable, "-m", "backfill.sim", "--port", "0", "--latency", str(latency)]
    cmd += ["--latency-sigma", "0.5", "--output-tokens", str(output_tokens), "--burst-s", str(SIM_BURST_S)]
    if rpm:
        cmd += ["--rpm", str(rpm)]
    if tpm:
        cmd += ["--tpm", str(tpm)]
    if log_path is not None:
        cmd += ["--log", str(log_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    urls = [w.strip("();,") for w in line.split() if w.lstrip("(").startswith("http")]
    if not urls:
        proc.kill()
        raise RuntimeError(f"The simulator did not start: {line!r}")
    try:
        yield Sim(urls[-1], log_path, proc)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def sim_counts(log: Path) -> SimCounts:
    # Here, not at the top: clients.py imports this module, and a competitor's process must not
    # pay for importing backfill (about half a second and 40 MB).
    from backfill.sim.log import read_jsonl

    entries = read_jsonl(log)
    answered: Counter[str] = Counter(e.request_hash for e in entries if e.status == 200)
    return SimCounts(
        requests=len(entries),
        ok=sum(answered.values()),
        rate_limited=sum(1 for e in entries if e.status == 429),
        resent=sum(n - 1 for n in answered.values()),
        first_s=min((e.t for e in entries), default=0.0),
        last_s=max((e.t for e in entries), default=0.0),
    )


# --- the event loop ----------------------------------------------------------------------------


def use_uvloop() -> None:
    """Every event loop this process makes is uvloop's: asyncio.run, new_event_loop and the loops
    the tools make for themselves (Curator's asyncio.run in its thread). backfill runs on uvloop
    by default, so every tool gets it too and the CPU ratios compare the tools, not the loops."""
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# --- one client run ----------------------------------------------------------------------------


def venv_env(tool: str, workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    # Keep every tool off the network and free of hub or telemetry calls; the sim takes any key.
    env.update(
        OPENAI_API_KEY="sk-bench",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(workdir / "hf"),
        TELEMETRY_ENABLED="false",
        CURATOR_VIEWER="0",
        CURATOR_DISABLE_RICH_DISPLAY="1",
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


def start_client(cfg: ClientConfig, workdir: Path) -> subprocess.Popen[str]:
    cfg_path = workdir / f"{cfg.tool}-{Path(cfg.out).stem}.json"
    cfg_path.write_text(json.dumps(asdict(cfg)))
    log = open(workdir / f"{cfg.tool}-{Path(cfg.out).stem}.log", "w")
    return subprocess.Popen(
        [sys.executable, str(BENCH / "clients.py"), str(cfg_path)],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=venv_env(cfg.tool, workdir),
    )


def finish_client(proc: subprocess.Popen[str], cfg: ClientConfig, expected_ids: int, timeout_s: float) -> ClientResult:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return ClientResult(cfg.tool, ok=False, why=f"did not finish within {timeout_s:.0f} s")
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("BENCH_RESULT ")), None)
    if line is None:
        log = Path(cfg.out).parent / f"{cfg.tool}-{Path(cfg.out).stem}.log"
        tail = log.read_text().strip().splitlines()[-1:] if log.exists() else []
        return ClientResult(cfg.tool, ok=False, why=f"exited {proc.returncode}: {' '.join(tail)[:200]}")
    result = ClientResult(**json.loads(line.removeprefix("BENCH_RESULT ")))
    if result.ok:
        check_rows(result, Path(cfg.check), expected_ids)
    return result


def unbounded(tool: str) -> dict[str, float]:
    """The limits to tell a tool when the sim has none."""
    if tool == "curator":
        return {"rpm": CURATOR_UNBOUNDED_RPM, "tpm": CURATOR_UNBOUNDED_RPM * 1000}
    return {}


def fresh(cfg: ClientConfig) -> None:
    """No state from an earlier run: no ledger or cache to answer from, no output to find."""
    if cfg.state_dir:
        shutil.rmtree(cfg.state_dir, ignore_errors=True)
    for path in (cfg.out, cfg.check):
        Path(path).unlink(missing_ok=True)


def run_client(cfg: ClientConfig, workdir: Path, expected_ids: int, timeout_s: float = 3600) -> ClientResult:
    fresh(cfg)
    return finish_client(start_client(cfg, workdir), cfg, expected_ids, timeout_s)


def check_rows(result: ClientResult, check: Path, expected_ids: int) -> None:
    """Every input row exactly once: ids unique and complete; rows_ok counts answered ones."""
    table = pq.read_table(check)
    ids = table.column("id").to_pylist()
    seen = Counter(ids)
    result.rows = len(ids)
    result.duplicated = sum(n - 1 for n in seen.values())
    result.missing = sum(1 for i in range(expected_ids) if i not in seen)
    result.rows_ok = sum(1 for ok in table.column("ok").to_pylist() if ok)


# --- scripts and tables ------------------------------------------------------------------------


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--scale", type=float, default=1.0, help="multiply the issue's sizes (1.0 = as in the issue)")
    p.add_argument("--tools", default=",".join(TOOLS), help="comma-separated: " + ",".join(TOOLS))
    p.add_argument("--workdir", default=None, help="where inputs, logs and outputs go (default: a temp dir)")
    return p


@contextmanager
def workdir(arg: str | None, name: str) -> Iterator[Path]:
    if arg:
        path = Path(arg) / name
        path.mkdir(parents=True, exist_ok=True)
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            yield Path(tmp)


def tools(arg: str) -> list[str]:
    chosen = [t.strip() for t in arg.split(",") if t.strip()]
    unknown = set(chosen) - set(TOOLS)
    if unknown:
        raise SystemExit(f"Unknown tools {sorted(unknown)}; choose from {', '.join(TOOLS)}.")
    return chosen


def table(title: str, header: list[str], rows: list[list[str]], notes: list[str] = ()) -> str:
    """A Markdown table (readable in a terminal too)."""
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def emit(name: str, text: str, data: object) -> None:
    """Print the table and keep it (and the raw numbers) under bench/results/."""
    print(text, flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1, default=lambda o: asdict(o)))


def rows_cell(r: ClientResult, expected: int) -> str:
    lost = expected - r.rows_ok
    return f"{r.rows_ok:,}/{expected:,}" + (f" ({r.duplicated} dup)" if r.duplicated else "") + ("" if lost == 0 else f", {lost:,} lost")


def fmt(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"

