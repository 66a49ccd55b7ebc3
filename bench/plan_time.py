#!/usr/bin/env python3
"""Time of a full-size dry-run (the memory plan, resident blocks fitted) per profile, as a user runs it.

    python bench/plan_time.py [--model-dir /tmp/sparse-full] [--profiles 8gb,12gb,16gb,24gb,48gb,80gb,cpu,cpu-lowram]
                              [--repeat 2] [--checkout PATH]

Each dry-run is a fresh `python generate.py --model-dir DIR --profile P --prompt x --dry-run --json` process:
interpreter and torch start-up, folder validation, the plan. Per profile, the first run ("cold") has an empty plan
cache (a fresh LOWVRAM_STEPVIDEO_CACHE folder) and traces; the next `--repeat` runs ("warm") find its traces on
disk (plan_cache.py), as every dry-run or run after the first does. Prints wall seconds and the process's CPU
seconds (user + system; on a shared machine wall time also counts waiting for a core, CPU time does not) and the
planned peaks. "cold plan s" is the planning alone (fit.check_fit, what a run does before it starts: after the
imports and the folder check), in a fresh process with an empty cache. `--checkout` times another checkout of the project (e.g. the main branch) with the same command.
The model folder is a zero-weight sparse release (tests/sparse_release.py, written when missing).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
PROFILES = "8gb,12gb,16gb,24gb,48gb,80gb,cpu,cpu-lowram"


def dry_run(checkout: Path, model_dir: Path, profile: str, cache: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(checkout / "generate.py"), "--model-dir", str(model_dir),
                           "--profile", profile, "--prompt", "x", "--dry-run", "--json"],
                          capture_output=True, text=True, cwd=checkout,
                          env={**os.environ, "PYTHONPATH": str(checkout), "LOWVRAM_STEPVIDEO_CACHE": str(cache)})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    try:
        plan = json.loads(proc.stdout)
    except ValueError:
        plan = {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return {"profile": profile, "wall_s": wall, "cpu_s": cpu, "rc": proc.returncode, "plan": plan}


PLANNING = """import sys, time
from lowvram_stepvideo.planning.fit import check_fit
from lowvram_stepvideo.loading.model_folder import open_model_folder
from lowvram_stepvideo.profiles import load_profile
folder, profile = open_model_folder(sys.argv[1]), load_profile(sys.argv[2])
start = time.perf_counter()
check_fit(folder, profile, profile.default_preset)
print(time.perf_counter() - start)"""


def planning_seconds(checkout: Path, model_dir: Path, profile: str) -> float:
    with tempfile.TemporaryDirectory() as cache:
        proc = subprocess.run([sys.executable, "-c", PLANNING, str(model_dir), profile], capture_output=True,
                              text=True, cwd=checkout, check=True,
                              env={**os.environ, "PYTHONPATH": str(checkout), "LOWVRAM_STEPVIDEO_CACHE": cache})
    return float(proc.stdout.split()[-1])


def _plan_part(run: dict) -> dict:
    """The plan without the budgets (available RAM moves a little between two runs)."""
    return {k: v for k, v in run["plan"].items() if not k.startswith("budget_")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/sparse-full"))
    ap.add_argument("--profiles", default=PROFILES)
    ap.add_argument("--repeat", type=int, default=2, help="warm runs per profile; the fastest is shown")
    ap.add_argument("--checkout", type=Path, default=ROOT, help="project checkout whose generate.py to time")
    args = ap.parse_args()
    if not (args.model_dir / "transformer").is_dir():
        subprocess.run([sys.executable, str(ROOT / "tests" / "sparse_release.py"), str(args.model_dir)],
                       check=True)
    print(f"full-size dry-run, {args.checkout}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'profile':<11} {'cold wall s':>11} {'cold cpu s':>10} {'warm wall s':>11} {'warm cpu s':>10} {'cold plan s':>11} {'rc':>3} "
          f"{'peak VRAM GiB':>14} {'peak host GiB':>14}")
    for profile in args.profiles.split(","):
        with tempfile.TemporaryDirectory() as cache:
            checkout = args.checkout.resolve()
            planning = planning_seconds(checkout, args.model_dir, profile)
            cold = dry_run(checkout, args.model_dir, profile, Path(cache))
            warm = min((dry_run(checkout, args.model_dir, profile, Path(cache)) for _ in range(args.repeat)),
                       key=lambda r: r["cpu_s"])
        plan = warm["plan"]
        peaks = (f"{plan.get('peak_vram_bytes', 0) / GiB:>14.2f} {plan.get('peak_host_bytes', 0) / GiB:>14.2f}"
                 if "error" not in plan else f"  {plan['error']}")
        same = "" if _plan_part(cold) == _plan_part(warm) else "  (cold and warm plans differ)"
        print(f"{profile:<11} {cold['wall_s']:>11.1f} {cold['cpu_s']:>10.1f} {warm['wall_s']:>11.1f} "
              f"{warm['cpu_s']:>10.1f} {planning:>11.1f} {max(cold['rc'], warm['rc']):>3} {peaks}{same}", flush=True)


if __name__ == "__main__":
    main()
