#!/usr/bin/env python3
"""Planned DiT-phase VRAM at full length: the DiT's chunking knobs off against the profile's settings.

    python bench/dit_memory.py [--model-dir /tmp/sparse-full] [--profiles 12gb,16gb,24gb] [--preset 204x544x992]
                               [--heads 8]

Runs the memory planner (lowvram_stepvideo/plan.py: the real pipeline on fake tensors, one denoising step) for each
profile three times: "off" = no token chunking (token_chunk = 0) and all heads at once; "tokens" = the
profile's token_chunk (which also chunks the DiT's other token-wise ops), all heads at once; "profile" = that
plus the attention head chunk (`attention_head_chunk` when profiles have that key, else --heads, applied around
pipeline.set_token_chunk). Prints the planned peak of the denoise phase, the DiT weights placed on
the device for it (profile streaming settings; the folder's own dtype) and their difference, the activations.

The model folder is a zero-weight sparse release (../shared/tools/make_sparse_release.py, written there when
missing): its DiT is bf16, so weights here are those of the bf16 release, about twice the int8 profiles' own.
"""
from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from lowvram_stepvideo import pipeline  # noqa: E402
from lowvram_stepvideo.model_folder import open_model_folder  # noqa: E402
from lowvram_stepvideo.models.dit import set_attention_head_chunk  # noqa: E402
from lowvram_stepvideo.plan import footprint, plan_memory  # noqa: E402
from lowvram_stepvideo.profiles import Preset, load_profile, with_overrides  # noqa: E402

GiB = 2**30
HEAD_KEY = "attention_head_chunk"


@contextlib.contextmanager
def head_chunk(profile, heads: int | None):
    """The profile to plan with, with the DiT's attention head chunk applied (0/None = all heads)."""
    if hasattr(profile, HEAD_KEY):                    # wired through the profile: pipeline.py sets it
        yield with_overrides(profile, **{HEAD_KEY: heads or 0})
        return
    plain = pipeline.set_token_chunk

    def set_both(model, tokens):
        plain(model, tokens)
        set_attention_head_chunk(model, heads or None)
    pipeline.set_token_chunk = set_both
    try:
        yield profile
    finally:
        pipeline.set_token_chunk = plain


def dit_weight_bytes(folder, profile) -> int:
    """Device bytes the denoise phase places for the DiT (non-block weights, resident blocks, streaming slots)."""
    reader = lambda ref: torch.empty(ref.shape, dtype=ref.dtype, device="meta")  # noqa: E731
    model = folder.open("transformer").load(profile.torch_dtype, "cpu", reader=reader)
    return footprint(model, profile.dit, profile)[0]


def plan_row(folder, profile, preset, tokens: int, heads: int | None) -> dict:
    profile = with_overrides(profile, token_chunk=tokens, presets=[preset])
    start = time.perf_counter()
    with head_chunk(profile, heads) as planned:
        peak = plan_memory(folder, planned, preset).phases["denoise"].peak_vram_bytes
    weights = dit_weight_bytes(folder, profile)
    return {"tokens": tokens or "all", "heads": heads or "all", "peak": peak, "weights": weights,
            "activations": peak - weights, "seconds": time.perf_counter() - start}


def ensure_folder(path: Path) -> None:
    if not (path / "transformer").is_dir():
        print(f"writing a sparse zero-weight release to {path} ...", file=sys.stderr)
        subprocess.run([sys.executable, str(SHARED / "tools" / "make_sparse_release.py"), str(path)], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/sparse-full"))
    ap.add_argument("--profiles", default="12gb,16gb,24gb")
    ap.add_argument("--preset", default="204x544x992", help="FRAMESxHEIGHTxWIDTH")
    ap.add_argument("--heads", type=int, default=8, help="head chunk for 'profile' rows when profiles lack the key")
    args = ap.parse_args()
    ensure_folder(args.model_dir)
    folder = open_model_folder(args.model_dir)
    preset = Preset.parse(args.preset, steps=1)
    print(f"planned denoise phase at {preset} ({preset.tokens} tokens), model folder {args.model_dir}")
    print(f"{'profile':<8} {'settings':<8} {'tokens':>6} {'heads':>5} {'peak GiB':>9} {'DiT weights':>11} "
          f"{'activations':>11} {'plan s':>6}")
    for name in args.profiles.split(","):
        profile = load_profile(name)
        heads = getattr(profile, HEAD_KEY, args.heads)
        settings = (("off", 0, None), ("tokens", profile.token_chunk, None),
                    ("profile", profile.token_chunk, heads))
        for label, tokens, h in settings:
            r = plan_row(folder, profile, preset, tokens, h)
            print(f"{name:<8} {label:<8} {r['tokens']:>6} {r['heads']:>5} {r['peak'] / GiB:>9.2f} "
                  f"{r['weights'] / GiB:>11.2f} {r['activations'] / GiB:>11.2f} {r['seconds']:>6.0f}", flush=True)


if __name__ == "__main__":
    main()
