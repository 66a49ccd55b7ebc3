#!/usr/bin/env python3
"""Every profile's full-size plan and its verdict on machines of several RAM sizes (for BENCHMARKS.md).

    python bench/verdicts.py --model-dir ./stepvideo-t2v [--ram-gib 16 32 64] [--profiles 8gb 24gb] [--json]

A Step-Video-TI2V folder is planned at each profile's first preset capped at TI2V's 102 frames, as a run plans it.

The folder may be the release (bf16) or the zero-weight one from tests/sparse_release.py: profiles sized for int8
are planned with --assume-format int8. Each cuda profile gets the card it is named for (8gb: 8 GiB, ...); cpu
profiles have RAM only. Prints two markdown tables: the plan of each profile at its first preset as written (no
fitting), and per RAM size the verdict: the preset that would run, with what was lowered, or the suggestion.
Plans are memoized within this script (the verdicts for several RAM sizes re-plan the same layouts).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowvram_stepvideo.planning import plan  # noqa: E402
from lowvram_stepvideo.planning.fit import check_fit  # noqa: E402
from lowvram_stepvideo.planning.stacks import block_layout  # noqa: E402
from lowvram_stepvideo.loading.model_folder import open_model_folder  # noqa: E402
from lowvram_stepvideo.pipeline.sampling import sampling_defaults  # noqa: E402
from lowvram_stepvideo.profiles import list_profiles, load_profile  # noqa: E402

GiB = 2**30


def card_gib(name: str) -> float | None:
    m = re.fullmatch(r"(\d+)gb", name)
    return float(m[1]) if m else None


def memoize_plans() -> None:
    """Same folder, profile and preset: same plan (a bench-only shortcut; the library plans afresh each time)."""
    plans, original = {}, plan.plan_memory

    def memo(folder, profile, preset, assume_format=None, **kw):
        key = (folder, profile, preset, assume_format)
        if key not in plans:
            plans[key] = original(folder, profile, preset, assume_format, **kw)
        return plans[key]
    plan.plan_memory = memo


def first_preset(folder, profile):
    """The profile's first preset as a run of this folder takes it (TI2V: at most 102 frames)."""
    cap = sampling_defaults(False, folder.kind).get("max_frames")
    preset = profile.default_preset
    return dataclasses.replace(preset, frames=min(preset.frames, cap)) if cap else preset


def plan_row(folder, profile, fmt) -> dict:
    start = time.perf_counter()
    p = plan.plan_memory(folder, profile, first_preset(folder, profile), assume_format=fmt)
    return {"profile": profile.name, "weights": fmt or folder.weight_format,
            "preset": str(first_preset(folder, profile)),
            "phases": {n: [q.peak_vram_bytes, q.peak_host_bytes] for n, q in p.phases.items()},
            "seconds": round(time.perf_counter() - start, 1)}


def verdict_cell(folder, profile, fmt, ram_gib: float) -> dict:
    card = card_gib(profile.name)
    start = time.perf_counter()
    v = check_fit(folder, profile, first_preset(folder, profile), None if card is None else int(card * GiB),
                  int(ram_gib * GiB), assume_format=fmt)
    d = v.to_dict()
    dit = block_layout(v.folder, v.profile)["dit"]
    if v.fits:
        text = (f"{d['preset']}: DiT {dit['resident']} resident / {dit['packed_in_ram']} packed / "
                f"{dit['from_disk']} disk; host {d['peak_host_bytes'] / GiB:.1f} GiB")
    else:
        text = "no" + (f"; {v.suggested_profile} at {v.suggested_preset}" if v.suggested_profile else "")
    return {"ram_gib": ram_gib, "fits": v.fits, "text": text, "peak_vram_bytes": d["peak_vram_bytes"],
            "peak_host_bytes": d["peak_host_bytes"], "seconds": round(time.perf_counter() - start, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--ram-gib", type=float, nargs="+", default=[16, 32, 64])
    ap.add_argument("--profiles", nargs="+", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    folder = open_model_folder(args.model_dir)
    memoize_plans()
    rows = []
    for name in args.profiles or list_profiles():
        profile = load_profile(name)
        fmt = profile.weight_format if profile.weight_format != folder.weight_format else None
        row = plan_row(folder, profile, fmt)
        row["verdicts"] = [verdict_cell(folder, profile, fmt, ram) for ram in args.ram_gib]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps(rows, indent=1) if args.json else tables(rows, args.ram_gib))
    return 0


def tables(rows: list[dict], rams: list[float]) -> str:
    g = lambda n: f"{n / GiB:.2f}"   # noqa: E731
    phases = list(rows[0]["phases"]) if rows else []
    out = ["| profile | weights | card GiB | " + " | ".join(f"{p} VRAM / host" for p in phases) + " | plan s |",
           "|---|---|---:|" + "---:|" * (len(phases) + 1)]
    for r in rows:
        cells = [f"{g(v)} / {g(h)}" for v, h in r["phases"].values()]
        out.append(f"| {r['profile']} | {r['weights']} | {card_gib(r['profile']) or '-'} | {' | '.join(cells)} | "
                   f"{r['seconds']} |")
    out += ["", "| profile | " + " | ".join(f"{ram:g} GB machine" for ram in rams) + " |",
            "|---|" + "---|" * len(rams)]
    for r in rows:
        out.append(f"| {r['profile']} | " + " | ".join(c["text"] for c in r["verdicts"]) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
