"""generate.py: argument parsing, one-line errors, and the run from prompt to mp4 + sidecar."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
import time
from pathlib import Path

import torch

from . import exit_codes, plan_for
from ..engines import parallel
from ..run import outputs, preflight
from ..planning.budgets import use_expandable_segments
from ..files.configs import ConfigError
from ..errors import StepVideoError, UsageError
from ..run.oom import out_of_memory_line
from ..run.outputs import RESULTS
from ..run.preflight import JobSpec
from ..profiles import describe, detect_vram_bytes, list_profiles, load_profile, profiles_dir, with_overrides
from ..planning.budgets import auto_choice, this_card
from ..run.resume import load_latents
from ..run.job import Interrupted, PhasePipeline, decode_frames, note_weight_format, run_job, say as _say
from ..defaults import CHECKPOINT_EVERY, RELEASE_PRESET, RELEASE_SAMPLING, SEED, TURBO_SAMPLING, WEB_PORT
from ..defaults import MOTION_SCORE_MAX, TI2V_SAMPLING
from . import batch
from ..planning.fit import check_fit
from .web import serve

GiB = 2**30


EPILOG = """\
examples:
  %(prog)s --demo --prompt "a cat playing piano"
      the tiny built-in random model on the CPU: checks the install in a few seconds
  %(prog)s --model-dir ./stepvideo-t2v-int8 --prompt "a red fox in the snow" --output fox.mp4
      the profile is picked by the GPU's memory and the RAM (--profile auto); the largest preset that fits runs
  %(prog)s --model-dir ./stepvideo-t2v-int8 --profile 16gb --prompt "test" --dry-run
      the memory plan of each phase against this machine's VRAM and RAM, and whether it fits (nothing generated)
  %(prog)s --model-dir ./stepvideo-t2v --profile 12gb --prompt "test" --dry-run --assume-format int8 \
      --vram-gib 12 --ram-gib 32
      what a 12 GB card in a 32 GB machine would do with this folder once quantized to int8
  %(prog)s --model-dir ./stepvideo-t2v-int8 --prompt "a red fox in the snow" --output fox.mp4 --resume
      continue a run that was interrupted (Ctrl-C, crash), from the checkpoint saved next to fox.mp4
  %(prog)s --model-dir stepfun-ai/stepvideo-t2v --card "RTX 3060" --ram-gib 32 --prompt "test" --dry-run
      will the release run on a 12 GB RTX 3060 in a 32 GB machine, how, and how long (nothing downloaded)
  %(prog)s --model-dir ./stepvideo-ti2v-int8 --image fox.jpg --prompt "the fox turns its head" --output fox.mp4
      image to video (Step-Video-TI2V): the image is the first frame; --motion-score 2 steady .. 10-20 lively
  %(prog)s --list-profiles
      the memory tiers and their preset ladders
  %(prog)s --web --demo
      the local web page on http://127.0.0.1:7860/ (pip install -e ".[web]"): queue, progress, cancel, videos

presets:
  Each profile has a ladder of presets written FRAMESxHEIGHTxWIDTH@STEPS: 204x544x992@50 is 204 frames
  (8.2 s at 25 fps) of 544 x 992 pixels (height x width) in 50 denoising steps. The first is the default; a
  run that does not fit steps down the ladder. --frames, --height, --width and --steps replace single values.

exit status:
  0 done; 2 bad input (a one-line "error: ..." says what to change); 3 --dry-run: nothing on the ladder fits;
  4 --prompts-file: some videos failed (see the summary); 130 interrupted (a resume checkpoint is saved);
  1 unexpected error (a bug: the traceback helps)

batches:
  --prompts-file FILE: one prompt per line (UTF-8; blank lines and lines starting with # are skipped; a line may
  end with " --seed N"; with a TI2V folder it may start with "image=PATH ", relative to the file). The text
  encoders run once for all prompts, then each video is made in turn, named <line>-<prompt start>-seed<N>.mp4
  in --output-dir (default results/<file name>/), with summary.json. Run the
  same command again after an interruption: finished videos are skipped, the interrupted one resumes.
"""


def build_parser(prog: str = "generate.py") -> argparse.ArgumentParser:
    release, turbo, size = RELEASE_SAMPLING, TURBO_SAMPLING, RELEASE_PRESET
    p = argparse.ArgumentParser(prog=prog, description="Text to video with Step-Video-T2V on one GPU (or the CPU).",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, help="the downloaded stepvideo-t2v folder, or quantize.py's output")
    p.add_argument("--demo", action="store_true",
                   help="use a built-in tiny random-weight model (CPU, no downloads; the video is noise)")
    p.add_argument("--profile", default=None,
                   help="memory tier name or path to a .toml file (default: auto = the largest tier that fits the "
                        "detected GPU, its host RAM fitted to this machine's; without a GPU the cpu tier that fits "
                        f"the RAM; with --demo: cpu). Tiers: {', '.join(list_profiles())}")
    p.add_argument("--prompt", help="what the video shows (English or Chinese)")
    p.add_argument("--prompts-file", type=Path, help="a batch: one prompt per line (see 'batches' below)")
    p.add_argument("--seeds", help="with --prompts-file: make each prompt once per seed, e.g. 0,1,2 (default: --seed)")
    p.add_argument("--output-dir", type=Path,
                   help="with --prompts-file: where the videos and summary.json go (default results/<file name>/)")
    p.add_argument("--negative-prompt", help="what to avoid (default: the reference's negative prompt)")
    p.add_argument("--image", type=Path,
                   help="image to video (a stepvideo-ti2v folder; with --demo the tiny TI2V model): the first frame, "
                        "PNG, JPEG or WebP, scaled to cover the video and centre cropped")
    p.add_argument("--motion-score", type=float, metavar="X",
                   help=f"with --image: how much moves, 0-{MOTION_SCORE_MAX:g} (default "
                        f"{TI2V_SAMPLING['motion_score']:g}; 2 steady, 10-20 lively)")
    p.add_argument("--frames", type=int,
                   help=f"number of frames, a multiple of 17 (default: the profile's first preset; release "
                        f"{size.frames})")
    p.add_argument("--height", type=int, help=f"height in pixels, a multiple of 16 (release {size.height})")
    p.add_argument("--width", type=int, help=f"width in pixels, a multiple of 16 (release {size.width})")
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
                        f"{turbo['guidance_scale']:g}, shift {turbo['shift']:g}); automatic for a turbo folder "
                        "(quantize.py records it; else model_index.json or a folder name with 'turbo')")
    p.add_argument("--seed", type=int, default=SEED,
                   help="seed of the initial noise (default %(default)s): the same seed, prompt and settings give the same "
                        "video, another seed another video; an integer from 0 to 2**64-1")
    p.add_argument("--output", type=Path, help="mp4 path (default: results/<prompt>-<time>.mp4, made unique; "
                                               "missing folders are created); the metadata goes next to it as "
                                               "<output>.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs (and start again over an earlier run's resume checkpoint)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the memory plan of every phase against this machine's budgets and whether it fits, "
                        "then exit (status 0 fits, 3 nothing on the ladder fits): the pipeline runs on fake tensors "
                        "(no weights are read, nothing is generated; a few seconds)")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    p.add_argument("--vram-gib", type=float, metavar="N",
                   help="with --dry-run: plan for a card of N GiB instead of this machine's (e.g. 12)")
    p.add_argument("--ram-gib", type=float, metavar="N",
                   help="with --dry-run: plan for a machine with N GiB of RAM instead of this one (e.g. 32)")
    p.add_argument("--assume-format", choices=["int8", "fp8"],
                   help="with --dry-run: plan a release (bf16) folder as quantize.py's output in this format")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its checkpoint (interrupted while decoding: decode again, "
                        "--save-latents included, no --overwrite needed)")
    p.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY,
                   help="save the latents every N steps for --resume (default %(default)s; 0 = never)")
    p.add_argument("--preview", type=int, metavar="N",
                   help="watch it form: every N denoising steps write a small animated preview of the video so far "
                        "next to the output (OUT.mp4.preview.webp; default off)")
    p.add_argument("--save-latents", type=Path, help="also keep the final latents in this .safetensors file")
    p.add_argument("--decode-latents", type=Path,
                   help="skip the text and denoising phases: only decode latents saved with --save-latents")
    p.add_argument("--no-text-cache", action="store_true",
                   help="do not read or write the text-embedding cache (~/.cache/lowvram-stepvideo/embeddings)")
    _old_name(p, "--no-cache", "--no-text-cache", nargs=0, const=True)
    p.add_argument("--attention", choices=["sdpa", "flash", "sage", "auto"],
                   help="attention backend instead of the profile's: sdpa (PyTorch), flash (flash-attn), sage "
                        "(SageAttention), auto (the fastest installed)")
    p.add_argument("--matmul", choices=["weight-only", "fast"],
                   help="matmuls of int8/fp8 folders instead of the profile's: weight-only (exact: weights expanded "
                        "to bf16) or fast (int8 x int8 / fp8 x fp8 tensor-core matmuls on cards that have them; "
                        "also rounds the activations)")
    p.add_argument("--step-cache", type=float, metavar="THRESHOLD",
                   help="first-block step cache (default off): skip the other DiT blocks while the first block's "
                        "output changes by less than THRESHOLD (e.g. 0.1); faster, slightly different video")
    _old_name(p, "--cache", "--step-cache", type=float)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the DiT blocks (the first step compiles; needs Triton on CUDA)")
    p.add_argument("--resident-blocks", type=int,
                   help="DiT blocks kept on the GPU instead of the profile's (the rest are streamed)")
    p.add_argument("--vae-tile", type=int,
                   help="VAE decode tile in latent pixels (x16 image pixels) instead of the profile's; 0 = untiled")
    p.add_argument("--list-profiles", action="store_true", help="list the profiles with their presets and exit")
    plan_for.add_arguments(p)
    p.add_argument("--web", action="store_true",
                   help="serve the local web page instead of making one video (needs the web extra: pip install "
                        "-e \".[web]\"); its model list is --model-dir, --demo and the folders of "
                        "~/.config/lowvram-stepvideo/web.toml")
    p.add_argument("--port", type=int, help=f"with --web: the port (default {WEB_PORT})")
    p.add_argument("--listen", action="store_true",
                   help="with --web: serve on every network interface instead of 127.0.0.1 (no password!)")
    p.add_argument("--parallel", choices=parallel.MODES,
                   help="under torchrun --nproc-per-node N (one GPU per process): cfg = 2 processes, one guidance "
                        "branch each; sequence = the DiT's tokens split across all N; auto (default under "
                        "torchrun) = cfg x sequence when N is even, else sequence")
    return p


class _OldName(argparse.Action):
    """A flag's old spelling, taken for one release: it sets the new flag's value and says the new name."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        _say(f"note: {option_string} is now {self.new} (the old name goes in the next release)")
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def _old_name(p: argparse.ArgumentParser, old: str, new: str, **kwargs) -> None:
    """`old` as another spelling of the flag `new` (added just before), left out of --help."""
    p.add_argument(old, action=_OldName, new=new, dest=new.lstrip("-").replace("-", "_"), default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS, **kwargs)


def main(argv: list[str], prog: str = "generate.py") -> int:
    """The command line; Ctrl-C at any moment of it (parsing included) is one line and exit 130."""
    try:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        use_expandable_segments()   # before anything initialises CUDA
        args = build_parser(prog).parse_args(argv)
        return run(args)
    except Interrupted as e:
        _say(str(e))
        return exit_codes.INTERRUPTED
    except KeyboardInterrupt:
        _say("interrupted")
        return exit_codes.INTERRUPTED
    except (StepVideoError, ValueError) as e:
        _say(f"error: {e}")
        return exit_codes.BAD_INPUT
    except (torch.OutOfMemoryError, RuntimeError) as e:   # one no fallback handled (e.g. placing the VAE)
        line = out_of_memory_line(e)
        if line is None:
            raise
        _say(f"error: {line}")
        return exit_codes.BAD_INPUT
    finally:
        parallel.close()


def run(args) -> int:
    if args.list_profiles:
        return exit_codes.OK if _list_profiles() else exit_codes.BAD_INPUT
    if args.list_cards:
        plan_for.list_cards(args.json)
        return exit_codes.OK
    if args.port is not None and not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: must be 1-65535 (default {WEB_PORT})")
    if args.web:
        _check_web_flags(args)
        return serve(args.model_dir, args.demo, args.profile, args.port, args.listen)
    if args.port is not None or args.listen:
        raise UsageError("--port and --listen go with --web (python generate.py --web --demo --port 8080)")
    _check_dry_run_flags(args)
    if args.dry_run and args.decode_latents:
        raise UsageError("--dry-run plans a generation; --decode-latents only runs the VAE (nothing to plan): "
                         "drop one of them")
    spec = job_spec(args)
    if args.prompts_file:
        return _batch(args, spec)
    _check_not_batch(args)
    if args.decode_latents:
        if parallel.launched_by_torchrun():
            raise UsageError("--decode-latents runs in one process; start it with python, not torchrun")
        return _decode_only(args, spec)
    if args.dry_run:
        return _dry_run(args, spec)
    run_job(spec)
    return exit_codes.OK


def _check_not_batch(args) -> None:
    given = [f for f in ("seeds", "output_dir") if getattr(args, f) is not None]
    if given:
        raise UsageError(f"--{given[0].replace('_', '-')} goes with --prompts-file")


def _batch(args, spec: JobSpec) -> int:
    clash = [f for f in ("prompt", "output", "save_latents", "decode_latents", "dry_run") if getattr(args, f)]
    if clash:
        raise UsageError(f"--{clash[0].replace('_', '-')} does not go with --prompts-file (the prompts come from "
                         "the file, the videos go to --output-dir; plan with --dry-run --prompt, sizes are shared)")
    seeds = batch.parse_seeds(args.seeds) if args.seeds is not None else None
    items = batch.read_prompts_file(args.prompts_file, seeds, args.seed)
    out_dir = args.output_dir or RESULTS / args.prompts_file.stem
    report = batch.run_batch(items, spec, out_dir, _say, inputs=(args.prompts_file,))
    return exit_codes.OK if report.ok else exit_codes.BATCH_INCOMPLETE


WEB_FLAGS = {"web", "model_dir", "demo", "profile", "port", "listen"}


def _check_web_flags(args) -> None:
    """--web takes its settings from the page: a flag for one video given with it would be silently ignored."""
    defaults = vars(build_parser().parse_args([]))
    extra = [k for k, v in vars(args).items() if k not in WEB_FLAGS and v != defaults[k]]
    if extra:
        raise UsageError(f"--{extra[0].replace('_', '-')} does not go with --web (set it in the page); --web takes "
                         "--model-dir, --demo, --profile, --port and --listen")


def job_spec(args) -> JobSpec:
    options = {"attention": args.attention, "matmul": args.matmul, "dit_resident_blocks": args.resident_blocks,
               "vae_tile": args.vae_tile, "step_cache": args.step_cache, "compile": args.compile or None,
               "resume": args.resume, "checkpoint_every": args.checkpoint_every, "save_latents": args.save_latents,
               "text_cache": not args.no_text_cache, "overwrite": args.overwrite, "turbo": args.turbo,
               "parallel": args.parallel, "preview": args.preview}
    return JobSpec(args.prompt, args.negative_prompt, args.seed, args.frames, args.height, args.width, args.steps,
                   args.cfg, args.shift, args.model_dir, args.demo, args.profile, args.output,
                   {k: v for k, v in options.items() if v is not None}, args.image, args.motion_score)


def _list_profiles() -> bool:
    """Every profile with its description and ladder; one that does not load is listed as bad, with the reason.
    False when one is bad."""
    print(f"profiles in {profiles_dir()} (presets: FRAMESxHEIGHTxWIDTH@STEPS, the first is the default):")
    good = True
    for name in list_profiles():
        try:
            profile = load_profile(name)
        except (ConfigError, OSError) as e:   # one bad file does not hide the others
            print(f"{name:<12} BAD PROFILE: {e}")
            good = False
            continue
        print(f"{name:<12} {profile.description}")
        ladder = ", ".join(describe(profile)["presets"])
        print(textwrap.fill(ladder, width=108, initial_indent=" " * 13, subsequent_indent=" " * 13))
    return good


def _check_dry_run_flags(args) -> None:
    for flag in ("json", "vram_gib", "ram_gib", "assume_format", "card", "capability", "gpus"):
        if getattr(args, flag) not in (None, False) and not args.dry_run:
            raise UsageError(f"--{flag.replace('_', '-')} only goes with --dry-run")
    for flag in ("vram_gib", "ram_gib"):
        value = getattr(args, flag)
        if value is not None and not 0 < value < 2**20:
            raise UsageError(f"--{flag.replace('_', '-')} {value:g}: give the memory in GiB, e.g. 12 or 31.5")


def _dry_run(args, spec: JobSpec) -> int:
    """The verdict of the plan against this machine (or --vram-gib / --ram-gib): 0 when a preset of the ladder
    fits, 3 when none does."""
    layout = _dry_run_layout(args)
    if layout is not None and layout.rank:
        return exit_codes.OK   # rank 0 prints the plan (of one rank's share: see README)
    card = plan_for.target(args)
    vram = int(args.vram_gib * GiB) if args.vram_gib is not None else card.vram_bytes
    ram = None if args.ram_gib is None else int(args.ram_gib * GiB)
    folder = preflight.model_folder(spec, published=True)
    profile = _dry_run_profile(spec, vram, ram, card.capability)
    if layout is not None:
        _say(f"parallel: the plan of rank 0's share of {layout.describe()}")
        if layout.cfg == 2:
            profile = with_overrides(profile, cfg_mode="batch")   # as ParallelRuntime runs it
    assume_format = plan_for.release_format(folder, profile, args.assume_format, _say)
    if not assume_format:
        note_weight_format(folder, profile, _say)
    preset = preflight.dry_run_preset(spec, folder, profile, args.turbo or folder.turbo, _say)
    if vram is not None and profile.device == "cpu":
        _say(f"note: --vram-gib does not apply to profile {profile.name} (it computes in RAM; --ram-gib does)")
    processes = (args.gpus or parallel.processes_on_this_machine()) if layout else 1
    verdict = check_fit(folder, profile, preset, vram, ram, assume_format, preflight.speed_options(spec),
                        layout, card.card, card.capability, processes)
    asked = args.resident_blocks
    if asked is not None and verdict.profile.dit.resident_blocks < asked:
        _say(f"note: --resident-blocks {asked} lowered to {verdict.profile.dit.resident_blocks}: "
             f"more do not fit the budget")
    print(json.dumps(verdict.to_dict(), indent=2) if args.json else verdict.report())
    return exit_codes.OK if verdict.fits else exit_codes.DOES_NOT_FIT


def _dry_run_layout(args):
    """Under torchrun: this rank's place in the parallel run the dry-run plans (no process group is joined); with
    --gpus N: rank 0's place in a run of N processes."""
    if args.gpus is not None:
        if parallel.launched_by_torchrun():
            raise UsageError("--gpus plans a run of several processes from one: under torchrun drop it (the plan "
                             "takes torchrun's process count)")
        if not 1 <= args.gpus <= 64:
            raise UsageError(f"--gpus {args.gpus}: give the number of cards, 1 to 64")
        if args.gpus == 1:
            if args.parallel:
                raise UsageError(f"--parallel {args.parallel} needs --gpus 2 or more")
            return None
        return parallel.layout_for(args.parallel or "auto", args.gpus, 0)
    if not parallel.launched_by_torchrun():
        if args.parallel:
            raise UsageError(f"--parallel {args.parallel} needs several processes: launch with "
                             "torchrun --nproc-per-node N generate.py ... (one GPU per process)")
        return None
    return parallel.layout_for(args.parallel or "auto", int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]))


def _dry_run_profile(spec: JobSpec, vram: int | None, ram: int | None, capability=None):
    """The spec's profile; 'auto' picks for --vram-gib / --ram-gib (and the card's capability) when given, and says
    why."""
    if (spec.profile or ("cpu" if spec.demo else "auto")) != "auto":
        return preflight.profile_for(spec, need_device=False)
    capability = capability or (this_card()[1] if vram is None else None)
    profile, reason = auto_choice(detect_vram_bytes() if vram is None else vram, ram, capability)   # RAM-scaled
    _say(reason)
    return with_overrides(profile, **{k: v for k, v in spec.options.items() if k not in preflight.RUN_OPTIONS})


def _decode_only(args, spec: JobSpec) -> int:
    folder = preflight.model_folder(spec)
    folder.check_weights(("vae",))
    profile = preflight.profile_for(spec)
    planned = outputs.plan_outputs(args.output, prompt=args.prompt, inputs=[profile.path], model_root=folder.root,
                                   overwrite=args.overwrite, decode_from=args.decode_latents)
    try:
        pipe = PhasePipeline(folder, profile, log=_say)
        latents = load_latents(args.decode_latents, folder.root, pipe.latent_channels())
        start = time.perf_counter()
        frames = decode_frames(pipe, latents)
        meta = {"prompt": args.prompt, "decoded_from": str(args.decode_latents),
                "arguments": outputs.spec_arguments(spec)}
        outputs.write_outputs(planned, frames, pipe, meta, time.perf_counter() - start, _say)
    finally:
        planned.release()
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
