"""Run every workload, one after the other (the machine has 2 cores: the sim takes one, the client the
other), and gather their tables with the machine and the date into bench/results/latest.md.
Run: bench/.venv/bin/python bench/run_all.py [--scale 1.0] [--tools backfill,naive,litellm,curator] [--only w1,w4]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
import time

import psutil

from common import BENCH, RESULTS, TOOLS

WORKLOADS = {
    "w1": "w1_request_bound",
    "w2": "w2_token_bound",
    "w3": "w3_limits_learned",
    "w4": "w4_overhead",
    "w5": "w5_memory",
    "w6": "w6_resume",
    "w7": "w7_embeddings",
    "w8": "w8_startup",
}


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    mem = psutil.virtual_memory().total / 2**30
    return f"{psutil.cpu_count()} cores ({model}), {mem:.0f} GiB, Python {platform.python_version()}, {platform.system()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--tools", default=",".join(TOOLS))
    p.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated: " + ",".join(WORKLOADS))
    args = p.parse_args()
    chosen = [w.strip() for w in args.only.split(",") if w.strip()]
    started = time.perf_counter()
    for key in chosen:
        script = WORKLOADS[key]
        print(f"== {script} (scale {args.scale})", flush=True)
        cmd = [sys.executable, str(BENCH / f"{script}.py"), "--scale", str(args.scale)]
        if key not in ("w5", "w6"):
            cmd += ["--tools", args.tools]
        subprocess.run(cmd, check=False)
    took = (time.perf_counter() - started) / 60
    today = datetime.date.today().isoformat()
    head = f"## Results — {today}, scale {args.scale}\n\nMachine: {machine()}. The whole run took {took:.0f} minutes.\n\n"
    parts = [(RESULTS / f"{WORKLOADS[k]}.md").read_text() for k in chosen if (RESULTS / f"{WORKLOADS[k]}.md").exists()]
    (RESULTS / "latest.md").write_text(head + "\n".join(parts))
    print(head)


if __name__ == "__main__":
    main()
