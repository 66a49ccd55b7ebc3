#!/usr/bin/env python3
"""Check the memory plan against a real run on a CUDA GPU: per phase, planned peak vs torch.cuda.max_memory_allocated.

    python bench/plan_vs_gpu.py --model-dir ./stepvideo-t2v-int8 --profile 24gb [--preset 51x544x992] [--steps 2]
    python bench/plan_vs_gpu.py --demo --profile 24gb          # tiny demo model, whatever the card

Prints a markdown table (target: planned within 10% of measured). Needs CUDA; exits with a message without it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowvram_stepvideo.demo import DEMO_PRESET, build_demo_model  # noqa: E402
from lowvram_stepvideo.model_folder import open_model_folder  # noqa: E402
from lowvram_stepvideo.pipeline import StepVideoPipeline  # noqa: E402
from lowvram_stepvideo.plan import plan_memory  # noqa: E402
from lowvram_stepvideo.profiles import Preset, load_profile  # noqa: E402

GiB = 2**30


def measure(folder, profile, preset: Preset, steps: int) -> dict[str, int]:
    """Peak allocated bytes per phase of a real run."""
    pipe = StepVideoPipeline(folder, profile, progress=False, log=lambda msg: None)
    peaks: dict[str, int] = {}

    def hook(name: str, event: str) -> None:
        torch.cuda.synchronize()
        if event == "start":
            torch.cuda.reset_peak_memory_stats()
        else:
            peaks[name] = torch.cuda.max_memory_allocated()
    pipe.runtime.phase_listeners.append(hook)
    pipe(prompt="a red fox running through snow", num_frames=preset.frames, height=preset.height,
         width=preset.width, num_inference_steps=steps, output_type="video", seed=0)
    return peaks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path)
    ap.add_argument("--demo", action="store_true")
    ap.add_argument("--profile", default="24gb")
    ap.add_argument("--preset", help="FRAMESxHEIGHTxWIDTH (default: the profile's first, or the demo size)")
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("plan_vs_gpu: needs a CUDA GPU; none found")
        return 2
    folder = open_model_folder(build_demo_model() if args.demo else args.model_dir)
    profile = load_profile(args.profile)
    preset = Preset.parse(args.preset, args.steps) if args.preset else (DEMO_PRESET if args.demo
                                                                        else profile.default_preset)
    plan = plan_memory(folder, profile, preset)
    real = measure(folder, profile, preset, args.steps)
    print(f"card: {torch.cuda.get_device_name()}; profile {profile.name}; preset {preset}; torch {torch.__version__}")
    print("| phase | planned GiB | measured GiB | planned / measured |\n|---|---:|---:|---:|")
    for name, phase in plan.phases.items():
        got = real.get(name, 0)
        ratio = phase.peak_vram_bytes / got if got else float("nan")
        print(f"| {name} | {phase.peak_vram_bytes / GiB:.2f} | {got / GiB:.2f} | {ratio:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
