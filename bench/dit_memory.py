#!/usr/bin/env python3
"""Planned DiT-phase VRAM at full length: the DiT's chunking knobs off against the profile's settings.

    python bench/dit_memory.py [--model-dir /tmp/sparse-full] [--profiles 12gb,16gb,24gb] [--preset 204x544x992]

Runs the memory planner (lowvram_stepvideo/planning/plan.py: the real pipeline on data-free tensors, one denoising step)
for each profile three times: "off" = no token chunking (token_chunk = 0) and all heads at once; "tokens" = the
profile's token_chunk (which also chunks the DiT's other token-wise ops), all heads at once; "profile" = that
plus the profile's attention_head_chunk. Prints the planned peak of the denoise phase, the DiT weights placed on
the device for it (profile streaming settings; the folder's own dtype) and their difference, the activations.

The model folder is a zero-weight sparse release (tests/sparse_release.py, written there when
missing): its DiT is bf16, so weights here are those of the bf16 release, about twice the int8 profiles' own.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lowvram_stepvideo.loading.model_folder import open_model_folder  # noqa: E402
from lowvram_stepvideo.planning.plan import footprint, plan_memory  # noqa: E402
from lowvram_stepvideo.planning.planned_models import planned_model  # noqa: E402
from lowvram_stepvideo.profiles import Preset, load_profile, with_overrides  # noqa: E402
from lowvram_stepvideo.pipeline.machine import streaming_settings  # noqa: E402

GiB = 2**30


def dit_weight_bytes(folder, profile) -> int:
    """Device bytes the denoise phase places for the DiT (non-block weights, resident blocks, streaming slots)."""
    _, shape = planned_model(folder, "transformer", profile.torch_dtype)
    return footprint(shape, streaming_settings(profile, "dit", shape.blocks), profile)[0]


def plan_row(folder, profile, preset, tokens: int, heads: int) -> dict:
    profile = with_overrides(profile, token_chunk=tokens, attention_head_chunk=heads, presets=[preset])
    start = time.perf_counter()
    peak = plan_memory(folder, profile, preset).phases["denoise"].peak_vram_bytes
    weights = dit_weight_bytes(folder, profile)
    return {"tokens": tokens or "all", "heads": heads or "all", "peak": peak, "weights": weights,
            "activations": peak - weights, "seconds": time.perf_counter() - start}


def ensure_folder(path: Path) -> None:
    if not (path / "transformer").is_dir():
        print(f"writing a sparse zero-weight release to {path} ...", file=sys.stderr)
        subprocess.run([sys.executable, str(ROOT / "tests" / "sparse_release.py"), str(path)], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/sparse-full"))
    ap.add_argument("--profiles", default="12gb,16gb,24gb")
    ap.add_argument("--preset", default="204x544x992", help="FRAMESxHEIGHTxWIDTH")
    args = ap.parse_args()
    ensure_folder(args.model_dir)
    folder = open_model_folder(args.model_dir)
    preset = Preset.parse(args.preset, steps=1)
    print(f"planned denoise phase at {preset} ({preset.tokens} tokens), model folder {args.model_dir}")
    print(f"{'profile':<8} {'settings':<8} {'tokens':>6} {'heads':>5} {'peak GiB':>9} {'DiT weights':>11} "
          f"{'activations':>11} {'plan s':>6}")
    for name in args.profiles.split(","):
        profile = load_profile(name)
        settings = (("off", 0, 0), ("tokens", profile.token_chunk, 0),
                    ("profile", profile.token_chunk, profile.attention_head_chunk))
        for label, tokens, heads in settings:
            r = plan_row(folder, profile, preset, tokens, heads)
            print(f"{name:<8} {label:<8} {r['tokens']:>6} {r['heads']:>5} {r['peak'] / GiB:>9.2f} "
                  f"{r['weights'] / GiB:>11.2f} {r['activations'] / GiB:>11.2f} {r['seconds']:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
