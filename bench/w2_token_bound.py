"""Workload 2, token-bound: 20,000 chat requests (~400-token prompts, max_tokens 100) under 3,000,000
tokens/min (binding: ~500 tokens a request is ~6,000 requests/min) and 12,000 requests/min, latency 0.8 s.
Run: bench/.venv/bin/python bench/w2_token_bound.py [--scale 0.25] [--tools backfill,naive]
"""

from __future__ import annotations

import chat
from common import parser, tools, workdir


def workload(scale: float) -> chat.ChatWorkload:
    return chat.ChatWorkload(
        name="w2_token_bound",
        title="Workload 2 — token-bound",
        rows=int(20_000 * scale),
        words=400,
        max_tokens=100,
        rpm=12_000,
        tpm=3_000_000,
    )


def main() -> None:
    args = parser(__doc__).parse_args()
    with workdir(args.workdir, "w2") as wd:
        chat.run(workload(args.scale), tools(args.tools), wd)


if __name__ == "__main__":
    main()
