"""Workload 3, limits not given: workload 1 with no limits told to any tool; backfill learns them from the
sim's x-ratelimit-* headers (Curator reads them too; the others just retry their 429s).
Run: bench/.venv/bin/python bench/w3_limits_learned.py [--scale 0.25] [--tools backfill,naive]
"""

from __future__ import annotations

import dataclasses

import chat
import w1_request_bound
from common import parser, tools, workdir


def workload(scale: float) -> chat.ChatWorkload:
    w1 = w1_request_bound.workload(scale)
    return dataclasses.replace(w1, name="w3_limits_learned", title="Workload 3 — limits not given (learned from headers)", give_limits=False)


def main() -> None:
    args = parser(__doc__).parse_args()
    with workdir(args.workdir, "w3") as wd:
        chat.run(workload(args.scale), tools(args.tools), wd)


if __name__ == "__main__":
    main()
