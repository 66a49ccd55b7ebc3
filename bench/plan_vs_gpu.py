#!/usr/bin/env python3
"""Check the memory plan and the VRAM budget against a real run on a CUDA GPU.

    python bench/plan_vs_gpu.py --model-dir ./stepvideo-t2v-int8 --profile 24gb [--preset 51x544x992] [--steps 2]
    python bench/plan_vs_gpu.py --demo --profile 24gb          # tiny demo model, whatever the card

Per phase: the planned device peak against torch.cuda.max_memory_allocated (what the plan models: live tensors),
max_memory_reserved (what the caching allocator held: + fragmentation and cached blocks) and the peak of the
memory the driver reports in use (torch.cuda.mem_get_info, sampled every few milliseconds, minus what was in use
right after the CUDA context was created: + workspaces outside the allocator). The last two columns calibrate
budgets.VRAM_RESERVE; "context" (in use right after context creation, other processes included) calibrates
budgets.CUDA_CONTEXT_BYTES. Prints a markdown table (target: planned within 10% of allocated; driver-reported use
within the budget). Without CUDA it says so and exits 0 (nothing to measure).
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lowvram_stepvideo.planning.budgets import ALLOC_CONF, use_expandable_segments, vram_reserve  # noqa: E402
from lowvram_stepvideo.defaults import DEMO_PRESET  # noqa: E402
from lowvram_stepvideo.loading.demo import build_demo_model  # noqa: E402
from lowvram_stepvideo.planning.fit import check_fit  # noqa: E402
from lowvram_stepvideo.loading.model_folder import open_model_folder  # noqa: E402
from lowvram_stepvideo.pipeline.phases import PhasePipeline  # noqa: E402
from lowvram_stepvideo.profiles import Preset, load_profile  # noqa: E402

GiB = 2**30
SAMPLE_S = 0.005


class DriverPeak:
    """Peak of (total - free) as the driver reports it, sampled in a thread while a phase runs."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            self._stop.wait(SAMPLE_S)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def measure(folder, profile, preset: Preset, steps: int) -> dict[str, tuple[int, int, int]]:
    """Per phase of a real run: (max allocated, max reserved, driver-reported peak in use)."""
    pipe = PhasePipeline(folder, profile, progress=False, log=lambda msg: None)
    peaks: dict[str, tuple[int, int, int]] = {}
    sampler: list[DriverPeak] = []

    def hook(name: str, event: str) -> None:     # the pipeline's phase events
        torch.cuda.synchronize()
        if event == "start":
            torch.cuda.reset_peak_memory_stats()
            sampler.append(DriverPeak().__enter__())
        else:
            sampler[-1].__exit__()
            peaks[name] = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved(), sampler[-1].peak)
    pipe.runtime.phase_listeners.append(hook)
    pipe(prompt="a red fox running through snow", num_frames=preset.frames, height=preset.height,
         width=preset.width, num_inference_steps=steps, output_type="video", seed=0)
    return peaks


def main(argv=None) -> int:
    use_expandable_segments()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path)
    ap.add_argument("--demo", action="store_true")
    ap.add_argument("--profile", default="24gb")
    ap.add_argument("--preset", help="FRAMESxHEIGHTxWIDTH (default: the profile's first, or the demo size)")
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("plan_vs_gpu: skipped, no CUDA device (nothing to measure)")
        return 0
    free, total = torch.cuda.mem_get_info()       # creates the context
    context = total - free
    folder = open_model_folder(build_demo_model() if args.demo else args.model_dir)
    profile = load_profile(args.profile)
    preset = Preset.parse(args.preset, args.steps) if args.preset else (DEMO_PRESET if args.demo
                                                                        else profile.default_preset)
    verdict = check_fit(folder, profile, preset)
    real = measure(folder, verdict.profile, verdict.preset or preset, args.steps)
    print(f"card: {torch.cuda.get_device_name()}, {total / GiB:.1f} GiB; in use after context creation "
          f"{context / GiB:.2f} GiB; {ALLOC_CONF}={os.environ.get(ALLOC_CONF)}; torch {torch.__version__}")
    print(f"profile {profile.name} (fitted: {verdict.profile.dit.resident_blocks} DiT blocks resident); preset "
          f"{verdict.preset or preset}; budget {verdict.budget.vram_bytes / GiB:.2f} GiB ({verdict.budget.vram_from})")
    print("| phase | planned GiB | allocated GiB | planned / allocated | reserved GiB | driver in use - context GiB |"
          "\n|---|---:|---:|---:|---:|---:|")
    for name, phase in verdict.plan.phases.items():
        alloc, reserved, driver = real.get(name, (0, 0, 0))
        ratio = phase.peak_vram_bytes / alloc if alloc else float("nan")
        print(f"| {name} | {phase.peak_vram_bytes / GiB:.2f} | {alloc / GiB:.2f} | {ratio:.3f} | "
              f"{reserved / GiB:.2f} | {(driver - context) / GiB:.2f} |")
    used = max((d - context for _, _, d in real.values()), default=0)
    beyond = max((real.get(n, (0, 0, 0))[2] - context - p.peak_vram_bytes for n, p in verdict.plan.phases.items()),
                 default=0)
    print(f"budget {'held' if used <= verdict.budget.vram_bytes else 'EXCEEDED'}: driver-reported use peaked at "
          f"{used / GiB:.2f} GiB of {verdict.budget.vram_bytes / GiB:.2f} GiB; beyond the plan: {beyond / GiB:.2f} GiB "
          f"(budgets.vram_reserve gives {vram_reserve(total) / GiB:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
