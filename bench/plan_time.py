#!/usr/bin/env python3
"""Time of a full-size dry-run (the memory plan, resident blocks fitted) per profile, as a user runs it.

    python bench/plan_time.py [--model-dir /tmp/sparse-full] [--profiles 12gb,16gb,24gb,48gb,80gb,cpu,cpu-lowram]
                              [--repeat 2] [--checkout PATH]

Each dry-run is a fresh `python generate.py --model-dir DIR --profile P --prompt x --dry-run --json` process:
interpreter and torch start-up, folder validation, the plan. Prints wall seconds and the process's CPU seconds
(user + system; on a shared machine wall time also counts waiting for a core, CPU time does not) and the planned
peaks. `--checkout` times another checkout of the project (e.g. the main branch) with the same command.
The model folder is a zero-weight sparse release (../shared/tools/make_sparse_release.py, written when missing).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GiB = 2**30
PROFILES = "12gb,16gb,24gb,48gb,80gb,cpu,cpu-lowram"


def dry_run(checkout: Path, model_dir: Path, profile: str) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(checkout / "generate.py"), "--model-dir", str(model_dir),
                           "--profile", profile, "--prompt", "x", "--dry-run", "--json"],
                          capture_output=True, text=True, cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    try:
        plan = json.loads(proc.stdout)
    except ValueError:
        plan = {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return {"profile": profile, "wall_s": wall, "cpu_s": cpu, "rc": proc.returncode, "plan": plan}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/sparse-full"))
    ap.add_argument("--profiles", default=PROFILES)
    ap.add_argument("--repeat", type=int, default=2, help="runs per profile; the fastest is shown")
    ap.add_argument("--checkout", type=Path, default=ROOT, help="project checkout whose generate.py to time")
    args = ap.parse_args()
    if not (args.model_dir / "transformer").is_dir():
        subprocess.run([sys.executable, str(SHARED / "tools" / "make_sparse_release.py"), str(args.model_dir)],
                       check=True)
    print(f"full-size dry-run, {args.checkout}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'profile':<11} {'wall s':>7} {'cpu s':>6} {'rc':>3} {'peak VRAM GiB':>14} {'peak host GiB':>14}")
    for profile in args.profiles.split(","):
        runs = [dry_run(args.checkout.resolve(), args.model_dir, profile) for _ in range(args.repeat)]
        best = min(runs, key=lambda r: r["cpu_s"])
        plan = best["plan"]
        peaks = (f"{plan.get('peak_vram_bytes', 0) / GiB:>14.2f} {plan.get('peak_host_bytes', 0) / GiB:>14.2f}"
                 if "error" not in plan else f"  {plan['error']}")
        print(f"{profile:<11} {min(r['wall_s'] for r in runs):>7.1f} {best['cpu_s']:>6.1f} {best['rc']:>3} {peaks}",
              flush=True)


if __name__ == "__main__":
    main()
