"""generate.py: argument parsing, one-line errors, and the run from prompt to mp4 + sidecar."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from . import preflight, runner
from .errors import StepVideoError, UsageError
from .preflight import JobSpec
from .profiles import detect_vram_bytes, list_profiles, load_profile
from .runner import Interrupted, StepVideoPipeline, say as _say

GiB = 2**30


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="generate.py", description="Text to video with Step-Video-T2V on one GPU.")
    p.add_argument("--model-dir", type=Path, help="release folder (or quantize.py output)")
    p.add_argument("--demo", action="store_true", help="use a built-in tiny random model (CPU, no downloads)")
    p.add_argument("--profile", default=None, help=f"memory tier or .toml path; 'auto' picks by the card "
                                                   f"(available: {', '.join(list_profiles())})")
    p.add_argument("--prompt", help="what the video shows")
    p.add_argument("--negative-prompt", help="what to avoid (default: the reference's negative prompt)")
    p.add_argument("--frames", type=int, help="number of frames (multiple of 17; default from the profile)")
    p.add_argument("--height", type=int, help="pixels, multiple of 16")
    p.add_argument("--width", type=int, help="pixels, multiple of 16")
    p.add_argument("--steps", type=int, help="denoising steps (default 50, turbo 15)")
    p.add_argument("--cfg", type=float, help="guidance scale (default 9.0, turbo 5.0)")
    p.add_argument("--shift", type=float, help="time shift (default 13.0, turbo 17.0)")
    p.add_argument("--turbo", action="store_true",
                   help="use the turbo checkpoint's defaults (15 steps, cfg 5, shift 17)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, help="mp4 path (default: results/<prompt>-<time>.mp4)")
    p.add_argument("--dry-run", action="store_true", help="print the memory plan per phase and exit")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=5, help="save latents every N steps (0 = never)")
    p.add_argument("--save-latents", type=Path, help="also keep the final latents in this file")
    p.add_argument("--decode-latents", type=Path, help="only decode latents saved with --save-latents")
    p.add_argument("--no-cache", action="store_true", help="do not use the text-embedding cache")
    p.add_argument("--attention", choices=["sdpa", "flash", "sage", "auto"], help="override the profile's backend")
    p.add_argument("--resident-blocks", type=int, help="override: DiT blocks kept on the GPU")
    p.add_argument("--vae-tile", type=int, help="override: VAE tile in latent pixels (0 = untiled)")
    p.add_argument("--list-profiles", action="store_true", help="list the profiles and exit")
    return p


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except Interrupted as e:
        _say(str(e))
        return 130
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except (StepVideoError, ValueError) as e:
        _say(f"error: {e}")
        return 2
    except torch.OutOfMemoryError as e:   # one not handled by a fallback (e.g. placing the VAE)
        what = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _say(f"error: out of memory: {what}; use a smaller --profile or free GPU memory")
        return 2


def run(args) -> int:
    if args.list_profiles:
        for name in list_profiles():
            print(f"{name:<12} {load_profile(name).description}")
        return 0
    spec = job_spec(args)
    if args.json and not args.dry_run:
        raise UsageError("--json only goes with --dry-run")
    if args.decode_latents:
        return _decode_only(args, spec)
    if args.dry_run:
        return _dry_run(args, spec)
    runner.run_job(spec)
    return 0


def job_spec(args) -> JobSpec:
    options = {"attention": args.attention, "dit_resident_blocks": args.resident_blocks, "vae_tile": args.vae_tile,
               "resume": args.resume, "checkpoint_every": args.checkpoint_every, "save_latents": args.save_latents,
               "cache": not args.no_cache, "turbo": args.turbo}
    return JobSpec(args.prompt, args.negative_prompt, args.seed, args.frames, args.height, args.width, args.steps,
                   args.cfg, args.shift, args.model_dir, args.demo, args.profile, args.output,
                   {k: v for k, v in options.items() if v is not None})


def _dry_run(args, spec: JobSpec) -> int:
    """The plan for this profile and preset, with resident blocks lowered to fit the card (the detected one, else
    the profile's nominal size)."""
    from .plan import fit_profile
    folder = preflight.model_folder(spec)
    profile = preflight.profile_for(spec, need_device=False)
    runner.note_weight_format(folder, profile, _say)
    preflight.check_numbers(spec)
    turbo = args.turbo or folder.turbo
    preset = preflight.preset_for(spec, profile, runner.sampling_defaults(True)["steps"] if turbo else None, _say)
    vram = detect_vram_bytes()
    if vram is None:
        vram = profile.min_vram_gib * GiB if profile.device == "cuda" else profile.memory.host_ram_gb * GiB
    fitted, plan = fit_profile(folder, profile, preset, int(vram))
    te = fitted.text_encoders
    step_llm = "whole on the device" if te.placement == "device" else f"streamed, {te.resident_blocks} resident"
    if args.json:
        print(plan.to_json(dit_resident_blocks=fitted.dit.resident_blocks, step_llm=step_llm,
                           budget_bytes=int(vram)))
        return 0
    print(plan.table())
    print(f"DiT blocks resident: {fitted.dit.resident_blocks} (profile: up to {profile.dit.resident_blocks}); "
          f"step_llm: {step_llm}; budget {vram / GiB:.1f} GiB")
    if plan.peak_vram_bytes > vram:
        print(f"warning: the plan exceeds {vram / GiB:.1f} GiB; a real run steps down the preset ladder")
    if plan.peak_host_bytes > profile.memory.host_ram_gb * GiB:
        print(f"warning: planned host RAM exceeds the profile's host_ram_gb ({profile.memory.host_ram_gb})")
    return 0


def _decode_only(args, spec: JobSpec) -> int:
    from safetensors.torch import load_file
    folder = preflight.model_folder(spec)
    profile = preflight.profile_for(spec)
    try:
        latents = load_file(str(args.decode_latents))["latents"]
    except Exception as e:
        raise UsageError(f"{args.decode_latents}: not a latents file written by --save-latents ({e})") from None
    output = args.output or args.decode_latents.with_suffix(".mp4")
    preflight.check_writable(output)
    pipe = StepVideoPipeline(folder, profile, log=_say)
    channels = pipe.latent_channels()
    if latents.dim() != 5 or latents.shape[2] != channels:
        raise UsageError(f"{args.decode_latents}: latents of shape {tuple(latents.shape)} do not fit this model "
                         f"(expected (B, T, {channels}, h, w)); decode them with the model that made them")
    start = time.perf_counter()
    frames = runner.decode_frames(pipe, latents)
    meta = {"prompt": args.prompt, "decoded_from": str(args.decode_latents),
            "arguments": runner.spec_arguments(spec)}
    runner.write_outputs(output, frames, pipe, meta, time.perf_counter() - start, _say)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
