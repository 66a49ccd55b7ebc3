"""generate.py: argument parsing, one-line errors, and the run from prompt to mp4 + sidecar."""
from __future__ import annotations

import argparse
import datetime
import logging
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import torch

from . import demo, exit_codes, parallel
from .checkpoint import CheckpointError
from .config import ConfigError
from .fsutil import atomic_path
from .model_folder import ModelFolderError, open_model_folder
from .pipeline import RELEASE_DEFAULTS, TURBO_DEFAULTS, StepVideoPipeline
from .profiles import (Preset, auto_profile, describe, detect_vram_bytes, list_profiles, load_profile,
                       profiles_dir, with_overrides)
from .resume import ResumeError, checkpoint_path
from .runner import (Interrupted, OutOfMemory, Request, denoise_with_fallback, fit_to_card, ladder_from,
                     resume_ladder)
from .sampling import SEED_MAX, SEED_MIN, latent_shape
from .tiling import TileOOMError
from .video import VideoError, output_path_error, sidecar_path

GiB = 2**30


class UsageError(Exception):
    pass


EPILOG = """\
examples:
  %(prog)s --demo --prompt "a cat playing piano"
      the tiny built-in random model on the CPU: checks the install in about half a minute
  %(prog)s --model-dir ./stepvideo-t2v-int8 --prompt "a red fox in the snow" --output fox.mp4
      the profile is picked by the GPU's memory (--profile auto); the largest preset that fits runs
  %(prog)s --model-dir ./stepvideo-t2v-int8 --profile 16gb --prompt "test" --dry-run
      the memory plan of each phase on this card, without generating anything
  %(prog)s --model-dir ./stepvideo-t2v-int8 --prompt "a red fox in the snow" --output fox.mp4 --resume
      continue a run that was interrupted (Ctrl-C, crash), from the checkpoint saved next to fox.mp4
  %(prog)s --list-profiles
      the memory tiers and their preset ladders

presets:
  Each profile has a ladder of presets written FRAMESxHEIGHTxWIDTH@STEPS: 204x544x992@50 is 204 frames
  (8.2 s at 25 fps) of 544 x 992 pixels (height x width) in 50 denoising steps. The first is the default; a
  run that does not fit steps down the ladder. --frames, --height, --width and --steps replace single values.

exit status:
  0 done; 2 bad input (a one-line "error: ..." says what to change); 3 --dry-run: nothing on the ladder fits;
  130 interrupted (a resume checkpoint is saved); 1 unexpected error (a bug: the traceback helps)
"""


def build_parser(prog: str = "generate.py") -> argparse.ArgumentParser:
    release, turbo = RELEASE_DEFAULTS, TURBO_DEFAULTS
    p = argparse.ArgumentParser(prog=prog, description="Text to video with Step-Video-T2V on one GPU (or the CPU).",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, help="the downloaded stepvideo-t2v folder, or quantize.py's output")
    p.add_argument("--demo", action="store_true",
                   help="use a built-in tiny random-weight model (CPU, no downloads; the video is noise)")
    p.add_argument("--profile", default=None,
                   help="memory tier name or path to a .toml file (default: auto = the largest tier that fits the "
                        f"detected GPU, cpu without one; with --demo: cpu). Tiers: {', '.join(list_profiles())}")
    p.add_argument("--prompt", help="what the video shows (English or Chinese)")
    p.add_argument("--negative-prompt", help="what to avoid (default: the reference's negative prompt)")
    p.add_argument("--frames", type=int,
                   help="number of frames, a multiple of 17 (default: the profile's first preset; release 204)")
    p.add_argument("--height", type=int, help="height in pixels, a multiple of 16 (release 544)")
    p.add_argument("--width", type=int, help="width in pixels, a multiple of 16 (release 992)")
    p.add_argument("--steps", type=int,
                   help="denoising steps, at least 1 (default: the profile's preset, 30 or 50; "
                        f"turbo {turbo['steps']})")
    p.add_argument("--cfg", type=float,
                   help=f"guidance scale: how strongly the video follows the prompt (default "
                        f"{release['guidance_scale']}, turbo {turbo['guidance_scale']})")
    p.add_argument("--shift", type=float, help=f"time shift of the noise schedule, > 0 (default {release['shift']}, "
                                               f"turbo {turbo['shift']})")
    p.add_argument("--turbo", action="store_true",
                   help=f"use the turbo checkpoint's defaults ({turbo['steps']} steps, cfg "
                        f"{turbo['guidance_scale']:g}, shift {turbo['shift']:g}); automatic when the folder name "
                        "contains 'turbo'")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial noise (default 0): the same seed, prompt and settings give the same "
                        "video, another seed another video; an integer from -2^63 to 2^64-1")
    p.add_argument("--output", type=Path, help="mp4 path (default: results/<prompt>-<time>.mp4); the metadata "
                                               "goes next to it as <output>.json")
    p.add_argument("--dry-run", action="store_true",
                   help="print the memory plan of every phase and exit: the pipeline runs on fake tensors (no "
                        "weights are read, nothing is generated; seconds to a minute)")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=5,
                   help="save the latents every N steps for --resume (default %(default)s; 0 = never)")
    p.add_argument("--save-latents", type=Path, help="also keep the final latents in this .safetensors file")
    p.add_argument("--decode-latents", type=Path,
                   help="skip the text and denoising phases: only decode latents saved with --save-latents")
    p.add_argument("--no-cache", action="store_true",
                   help="do not read or write the text-embedding cache (~/.cache/lowvram-stepvideo/embeddings)")
    p.add_argument("--attention", choices=["sdpa", "flash", "sage", "auto"],
                   help="attention backend instead of the profile's: sdpa (PyTorch), flash (flash-attn), sage "
                        "(SageAttention), auto (the fastest installed)")
    p.add_argument("--resident-blocks", type=int,
                   help="DiT blocks kept on the GPU instead of the profile's (the rest are streamed)")
    p.add_argument("--vae-tile", type=int,
                   help="VAE decode tile in latent pixels (x16 image pixels) instead of the profile's; 0 = untiled")
    p.add_argument("--list-profiles", action="store_true", help="list the profiles with their presets and exit")
    p.add_argument("--parallel", choices=parallel.MODES,
                   help="under torchrun --nproc-per-node N (one GPU per process): cfg = 2 processes, one guidance "
                        "branch each; sequence = the DiT's tokens split across all N; auto (default under "
                        "torchrun) = cfg x sequence when N is even, else sequence")
    return p


def main(argv: list[str], prog: str = "generate.py") -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = build_parser(prog).parse_args(argv)
    try:
        return run(args)
    except Interrupted as e:
        _say(str(e))
        return exit_codes.INTERRUPTED
    except KeyboardInterrupt:
        _say("interrupted")
        return exit_codes.INTERRUPTED
    except (UsageError, ConfigError, CheckpointError, ModelFolderError, ResumeError, OutOfMemory, TileOOMError,
            VideoError, ValueError, parallel.ParallelError) as e:
        _say(f"error: {e}")
        return exit_codes.BAD_INPUT
    except torch.OutOfMemoryError as e:   # one not handled by a fallback (e.g. placing the VAE)
        what = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _say(f"error: out of memory: {what}; use a smaller --profile or free GPU memory")
        return exit_codes.BAD_INPUT
    finally:
        parallel.close()


def entry_point() -> None:
    """The `lowvram-stepvideo` command a pip install creates."""
    sys.exit(main(sys.argv[1:], prog="lowvram-stepvideo"))


def _say(msg: str) -> None:
    """A line on stderr; an open progress bar is cleared first and redrawn below it."""
    from tqdm import tqdm
    tqdm.write(msg, file=sys.stderr)
    sys.stderr.flush()


def run(args) -> int:
    if args.list_profiles:
        _list_profiles()
        return exit_codes.OK
    folder = _model_folder(args)
    profile = _profile(args)
    if folder.weight_format != profile.weight_format and profile.device == "cuda":
        _say(f"note: profile {profile.name} is sized for {profile.weight_format} weights and this folder has "
             f"{folder.weight_format}; the memory plan accounts for it"
             + (" (python quantize.py ... --format int8 halves the weights)" if folder.weight_format == "bf16" else ""))
    if args.json and not args.dry_run:
        raise UsageError("--json only goes with --dry-run")
    if args.decode_latents:
        return _decode_only(args, folder, profile)
    if not args.prompt or not args.prompt.strip():
        raise UsageError("--prompt is empty; describe the video to generate, e.g. --prompt \"a cat playing piano\"")
    _check_numbers(args)
    turbo = args.turbo or folder.turbo
    if turbo:
        profile = with_overrides(profile, presets=[replace(p, steps=TURBO_DEFAULTS["steps"]) for p in profile.presets])
    preset = _preset(args, profile, turbo)
    par = _parallel(args, profile)
    if par is not None and args.dry_run and not par.writer:
        return exit_codes.OK   # rank 0 prints the plan (of one process's share: see README)
    pipe = _pipeline(folder, profile, par)
    if args.dry_run:
        return _dry_run(args, pipe, preset)
    output = _output_path(args) if par is None or par.writer else None
    if par is not None:
        output = par.broadcast_from_writer(output)   # a default name has a time stamp: rank 0's is the one
    return _generate(args, pipe, preset, output, par)


def _parallel(args, profile):
    """This process's place in a torchrun launch (None when it runs alone)."""
    if not parallel.launched_by_torchrun():
        if args.parallel:
            raise UsageError(f"--parallel {args.parallel} needs several processes: launch with "
                             "torchrun --nproc-per-node N generate.py ... (one GPU per process)")
        return None
    if args.decode_latents:
        raise UsageError("--decode-latents runs in one process; start it with python, not torchrun")
    return parallel.init_from_env(args.parallel or "auto", profile.device)


def _pipeline(folder, profile, par):
    if par is None:
        return StepVideoPipeline(folder, profile, log=_say)
    log = _say if par.writer else (lambda msg: None)   # one copy of each message, from rank 0
    if par.writer:
        _say(f"parallel: {par.layout.describe()}")
    runtime = parallel.ParallelRuntime(folder, profile, par, log)
    return StepVideoPipeline(folder, profile, log=log, progress=par.writer, runtime=runtime)


def _list_profiles() -> None:
    print(f"profiles in {profiles_dir()} (presets: FRAMESxHEIGHTxWIDTH@STEPS, the first is the default):")
    for name in list_profiles():
        profile = load_profile(name)
        print(f"{name:<12} {profile.description}")
        ladder = ", ".join(describe(profile)["presets"])
        print(textwrap.fill(ladder, width=108, initial_indent=" " * 13, subsequent_indent=" " * 13))


def _model_folder(args):
    if args.demo:
        return open_model_folder(demo.build_demo_model())
    if args.model_dir is None:
        raise UsageError("give --model-dir PATH (the downloaded stepvideo-t2v folder) or --demo")
    return open_model_folder(args.model_dir)


def _profile(args):
    name = args.profile or ("cpu" if args.demo else "auto")
    vram = detect_vram_bytes()
    profile = auto_profile(vram) if name == "auto" else load_profile(name)
    if profile.device == "cuda" and vram is None and not args.dry_run:
        raise UsageError(f"profile {profile.name!r} needs a CUDA GPU and none was found; use --profile cpu "
                         "(slow) or --dry-run to see its memory plan")
    overrides = {"attention": args.attention, "dit_resident_blocks": args.resident_blocks, "vae_tile": args.vae_tile}
    return with_overrides(profile, **overrides)


def _check_numbers(args) -> None:
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps {args.steps}: needs at least 1 denoising step (release 30-50, turbo 15)")
    if args.shift is not None and not args.shift > 0:
        raise UsageError(f"--shift {args.shift}: must be positive (release 13, turbo 17)")
    if not SEED_MIN <= args.seed <= SEED_MAX:
        raise UsageError(f"--seed {args.seed}: must be an integer from -2^63 to 2^64-1")
    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every {args.checkpoint_every}: must be >= 0 (0 = never)")


def _preset(args, profile, turbo: bool = False) -> Preset:
    base = demo.DEMO_PRESET if args.demo else profile.default_preset
    given = {"frames": args.frames, "height": args.height, "width": args.width}
    bad = [f"--{k} {v}" for k, v in given.items() if v is not None and v < 1]
    if bad:
        raise UsageError(f"{bad[0]}: must be positive (frames in multiples of 17, height and width in multiples "
                         "of 16; the release uses 204 frames of 544x992)")
    frames, height, width = (args.frames or base.frames, args.height or base.height, args.width or base.width)
    if max(height, width) > 4096 or frames > 1024:
        raise UsageError(f"{frames} frames of {height}x{width} is beyond what the model was trained for "
                         "(the release uses 204 frames of 544x992); choose a smaller size")
    shape = latent_shape(frames, height, width)
    if shape.rounded:
        _say(f"warning: {frames}x{height}x{width} rounded to {shape.num_frames}x{shape.height}x{shape.width} "
             "(frames come in 17-frame chunks, sizes in multiples of 16)")
    steps = args.steps or (TURBO_DEFAULTS["steps"] if turbo else base.steps)
    return Preset(shape.num_frames, shape.height, shape.width, steps)


def _output_path(args) -> Path:
    out = args.output
    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        safe = "".join(c if c.isalnum() or c in " -_" else "_" for c in args.prompt[:50]).strip()
        out = Path("results") / f"{safe or 'video'}-{stamp}.mp4"
    _check_writable(out)
    if args.save_latents:
        _check_writable(args.save_latents)   # before the denoising, not after it
    return out


def _check_writable(path: Path) -> None:
    problem = output_path_error(path, create_dirs=path.parent == Path("results"))
    if problem:
        raise UsageError(problem)


def _dry_run(args, pipe, preset) -> int:
    """The plan for this profile and preset, with resident blocks lowered to fit the card (the detected one, else
    the profile's nominal size)."""
    from .plan import fit_profile
    profile = pipe.profile
    vram = detect_vram_bytes()
    if vram is None:
        vram = profile.min_vram_gib * GiB if profile.device == "cuda" else profile.memory.host_ram_gb * GiB
    par = getattr(pipe.runtime, "par", None)   # under torchrun: the plan of rank 0's share
    fitted, plan = fit_profile(pipe.folder, profile, preset, int(vram), layout=par and par.layout)
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


def _request(args, pipe, preset) -> Request:
    d = TURBO_DEFAULTS if args.turbo else pipe.defaults
    return Request(args.prompt, args.negative_prompt, preset, d["guidance_scale"] if args.cfg is None else args.cfg,
                   d["shift"] if args.shift is None else args.shift, args.seed)


def _generate(args, pipe, preset, output: Path, par=None) -> int:
    writer = par is None or par.writer
    if not args.no_cache and writer:   # the other ranks take rank 0's embeddings
        pipe.cache = pipe.embedding_cache()
    request = _request(args, pipe, preset)
    ladder = ladder_from(pipe.profile.presets, preset)
    vram = detect_vram_bytes()
    if par is not None and pipe.device.type == "cuda":   # this rank's card, not card 0
        vram = torch.cuda.get_device_properties(pipe.device).total_memory
    if pipe.device.type == "cuda" and vram and not args.resume:
        full = ladder
        ladder = fit_to_card(pipe, ladder, vram, pipe.log, par and par.layout)
        if par is not None:   # cards may differ: every rank runs the preset that fits the smallest
            ladder = full[par.agree_max(len(full) - len(ladder)):]
    ckpt = checkpoint_path(output)
    if args.resume:
        ladder = resume_ladder(ladder, ckpt)
    start = time.perf_counter()
    latents, used = denoise_with_fallback(pipe, request, ladder, ckpt, args.resume, args.checkpoint_every, par)
    if not writer:
        return 0   # rank 0 decodes and writes
    if args.save_latents:
        _save_latents(args.save_latents, latents)
    try:
        frames = _decode_frames(pipe, latents)
        _write_outputs(output, frames, args, pipe, request, used, time.perf_counter() - start)
    except BaseException:
        if ckpt.is_file():
            _say(f"note: the denoised latents are kept in {ckpt}; run the same command with --resume to only decode")
        raise
    ckpt.unlink(missing_ok=True)
    return 0


def _decode_frames(pipe, latents):
    from .video import postprocess
    with torch.no_grad():
        return postprocess(pipe.decode(latents))


def _save_latents(path: Path, latents: torch.Tensor) -> None:
    from safetensors.torch import save_file
    _check_writable(path)
    with atomic_path(path, ".safetensors") as tmp:
        save_file({"latents": latents.contiguous()}, str(tmp))


def _decode_only(args, folder, profile) -> int:
    from safetensors.torch import load_file
    try:
        latents = load_file(str(args.decode_latents))["latents"]
    except Exception as e:
        raise UsageError(f"{args.decode_latents}: not a latents file written by --save-latents ({e})") from None
    output = args.output or args.decode_latents.with_suffix(".mp4")
    _check_writable(output)
    pipe = StepVideoPipeline(folder, profile, log=_say)
    channels = pipe.latent_channels()
    if latents.dim() != 5 or latents.shape[2] != channels:
        raise UsageError(f"{args.decode_latents}: latents of shape {tuple(latents.shape)} do not fit this model "
                         f"(expected (B, T, {channels}, h, w)); decode them with the model that made them")
    start = time.perf_counter()
    frames = _decode_frames(pipe, latents)
    _write_outputs(output, frames, args, pipe, None, None, time.perf_counter() - start)
    return 0


def _write_outputs(output: Path, frames, args, pipe, request, preset, seconds: float) -> None:
    from .video import write_mp4, write_sidecar
    info = write_mp4(frames, output)
    if info.get("padded"):
        _say("note: odd frame size padded by one pixel for H.264 (yuv420p needs even sizes)")
    meta = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": args.seed,
            "model_dir": str(pipe.folder.root), "weight_format": pipe.folder.weight_format,
            "preset": str(preset) if preset else None, "steps": preset.steps if preset else None,
            "guidance_scale": request.guidance_scale if request else None, "shift": request.shift if request else None,
            "frames": int(frames.shape[0]), "size": [int(frames.shape[1]), int(frames.shape[2])],
            "fps": info["fps"], "width": info["width"], "height": info["height"],   # of the mp4 as written
            "duration_s": round(info["frames"] / info["fps"], 3),
            "profile": describe(pipe.profile), "timings_s": {k: round(v, 2) for k, v in pipe.timings.items()},
            "total_s": round(seconds, 2), "peak_vram_bytes": _peak_vram(pipe.device),
            "peak_host_bytes": _peak_host(), "turbo": bool(args.turbo or pipe.folder.turbo),
            "arguments": {k: v if v is None or isinstance(v, (bool, int, float)) else str(v)
                          for k, v in vars(args).items()},
            "torch": torch.__version__, "parallel": _parallel_layout(pipe)}
    write_sidecar(sidecar_path(output), meta)
    _say(f"wrote {output.resolve()} ({meta['frames']} frames, {info['width']}x{info['height']}, {info['fps']} fps) "
         f"and {sidecar_path(output).resolve()}")


def _parallel_layout(pipe) -> str | None:
    par = getattr(pipe.runtime, "par", None)
    return par.layout.describe() if par is not None else None


def _peak_vram(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _peak_host() -> int | None:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes); None where unknown."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
