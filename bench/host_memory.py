#!/usr/bin/env python3
"""Host RAM per phase: the memory plan against the peak RSS of a real CPU run, with a streamed layout.

    python bench/host_memory.py [--model-dir DIR] [--json] [--frames 17 --height 128 --width 128]

DIR (default /tmp/lowvram_stepvideo_sparse_4layers, written with tests/sparse_release.py --layers 4
when it does not hold a model folder yet) is a release folder; a 4-layer full-width slice keeps every block at its
real size. The run uses the cpu profile with bf16 compute (the folder's dtype: nothing is cast at load) and this
layout: DiT 1 resident block, prefetch 1, the others packed in RAM within a budget of `--packed-blocks` blocks and
the rest read from the checkpoint (source "ram"); step_llm streamed from disk (prefetch 1); CLIP and VAE whole.

Each phase (text, denoise with one guided step, decode) runs in a child process that resets the kernel's
high-water mark (`/proc/self/clear_refs`) before the phase and reads VmHWM after it: measured = that peak minus
the child's RSS before the first phase (Python, torch, the opened folder). Planned = the plan's peak of the
"device" (RAM, on a CPU profile) plus host RAM of that phase. The child runs with a fixed glibc mmap threshold so
freed buffers go back to the OS at once and one phase's leftovers do not show up in the next; file pages mapped
into the process (weights read through the memory map) count, as they do in RSS.

Prints a table, or with --json a list of {phase, planned_bytes, measured_bytes, ratio}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAKE_SPARSE = ROOT / "tests" / "sparse_release.py"
DEFAULT_FOLDER = Path("/tmp/lowvram_stepvideo_sparse_4layers")
PHASES = ("text", "denoise", "decode")
PROMPT = "a red fox running through fresh snow"
GiB = 2**30


def bench_profile(folder, frames: int, height: int, width: int, packed_blocks: float):
    """The cpu profile in bf16 with the streamed layout described in the module docstring."""
    import torch

    from lowvram_stepvideo.planning.planned_models import planned_model
    from lowvram_stepvideo.profiles import Preset, load_profile, with_overrides
    block = planned_model(folder, "transformer", torch.bfloat16)[1].block_bytes
    return with_overrides(
        load_profile("cpu"), compute_dtype="bfloat16", presets=[Preset(frames, height, width, 1)],
        memory_packed_gb=packed_blocks * block / GiB, dit_resident_blocks=1, dit_prefetch=1, dit_source="ram",
        text_encoders_placement="stream", text_encoders_resident_blocks=0, text_encoders_prefetch=1,
        text_encoders_source="disk")


def planned(folder, profile) -> dict[str, int]:
    from lowvram_stepvideo.planning.plan import plan_memory
    plan = plan_memory(folder, profile, profile.presets[0])   # any prompt plans the same
    return {name: p.peak_vram_bytes + p.peak_host_bytes for name, p in plan.phases.items()}


# ---------------------------------------------------------------- the measured run (child process)

def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split(key + ":")[1].split()[0]) * 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(folder, profile) -> dict[str, int]:
    """Run text, one denoising step and decode; peak RSS of each above the RSS before the first."""
    import torch

    from lowvram_stepvideo.pipeline.phases import PhasePipeline
    from lowvram_stepvideo.defaults import RELEASE_SAMPLING
    from lowvram_stepvideo.pipeline.sampling import flow_sigmas, initial_noise, latent_shape
    preset = profile.presets[0]
    pipe = PhasePipeline(folder, profile, progress=False, log=lambda msg: None)
    noise = initial_noise(latent_shape(preset.frames, preset.height, preset.width,
                                       channels=pipe.latent_channels()).shape, 0)
    sigmas = flow_sigmas(1, RELEASE_SAMPLING["shift"])
    baseline, out = _status_bytes("VmRSS"), {}
    steps = {"text": lambda _: pipe.encode_prompt(PROMPT),
             "denoise": lambda embeds: pipe.denoise(embeds, noise, sigmas, RELEASE_SAMPLING["guidance_scale"]),
             "decode": lambda latents: pipe.decode(latents)}
    value = None
    with torch.inference_mode():
        for name in PHASES:
            _reset_peak()
            value = steps[name](value)
            out[name] = _status_bytes("VmHWM") - baseline
    return out


def child_main(args) -> None:
    from lowvram_stepvideo.loading.model_folder import open_model_folder
    folder = open_model_folder(args.model_dir)
    profile = bench_profile(folder, args.frames, args.height, args.width, args.packed_blocks)
    print(json.dumps(measure(folder, profile)))


def measured_in_child(args) -> dict[str, int]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [sys.executable, __file__, "--child", "--model-dir", str(args.model_dir), "--frames", str(args.frames),
           "--height", str(args.height), "--width", str(args.width), "--packed-blocks", str(args.packed_blocks)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"the measured run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


# ---------------------------------------------------------------- driver

def ensure_folder(folder: Path) -> None:
    if (folder / "transformer").is_dir():
        return
    subprocess.run([sys.executable, str(MAKE_SPARSE), str(folder), "--layers", "4"], check=True,
                   stdout=subprocess.DEVNULL)


def rows(plan: dict[str, int], measured: dict[str, int]) -> list[dict]:
    return [{"phase": p, "planned_bytes": plan[p], "measured_bytes": measured[p],
             "ratio": round(measured[p] / plan[p], 3) if plan[p] else None} for p in PHASES]


def table(result: list[dict]) -> str:
    lines = ["| phase | planned GiB | measured GiB | measured / planned |", "|---|---:|---:|---:|"]
    for r in result:
        lines.append(f"| {r['phase']} | {r['planned_bytes'] / GiB:.2f} | {r['measured_bytes'] / GiB:.2f} | "
                     f"{r['ratio']} |")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_FOLDER)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--packed-blocks", type=float, default=1.5,
                    help="packed budget in DiT blocks (1.5: one block packed, the next read from the checkpoint)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return []
    if args.model_dir == DEFAULT_FOLDER:
        ensure_folder(args.model_dir)
    from lowvram_stepvideo.loading.model_folder import open_model_folder
    folder = open_model_folder(args.model_dir)
    profile = bench_profile(folder, args.frames, args.height, args.width, args.packed_blocks)
    result = rows(planned(folder, profile), measured_in_child(args))
    print(json.dumps(result, indent=2) if args.json else table(result))
    return result


if __name__ == "__main__":
    main()
