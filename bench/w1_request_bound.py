"""Workload 1, request-bound: 20,000 chat requests (~200-token prompts, max_tokens 50) at 12,000 requests/min
with a token limit that does not bind, latency 0.8 s; every tool on its own fresh simulator.
Run: bench/.venv/bin/python bench/w1_request_bound.py [--scale 0.25] [--tools backfill,naive]
"""

from __future__ import annotations

import chat
from common import parser, tools, workdir


def workload(scale: float) -> chat.ChatWorkload:
    return chat.ChatWorkload(
        name="w1_request_bound",
        title="Workload 1 — request-bound",
        rows=int(20_000 * scale),
        words=200,
        max_tokens=50,
        rpm=12_000,
        tpm=100_000_000,
    )


def main() -> None:
    args = parser(__doc__).parse_args()
    with workdir(args.workdir, "w1") as wd:
        chat.run(workload(args.scale), tools(args.tools), wd)


if __name__ == "__main__":
    main()
