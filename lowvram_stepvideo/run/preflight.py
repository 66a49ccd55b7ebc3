"""Everything checked before any heavy work: a job's request turned into a model folder, a profile the machine can
run (its explicit kernels probed on the card), a preset, the sampling settings and writable outputs, or a one-line
`StepVideoError` naming the fix."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..defaults import DEMO_PRESET, RELEASE_PRESET, RUN_OPTIONS, SEED, TURBO_SAMPLING, SpeedOptions, sampling_defaults
from ..engines import probes
from ..engines.target import Target, current_target
from ..errors import UsageError
from ..loading import demo
from ..loading.model_folder import ModelFolder, open_model_folder
from ..profiles import Preset, Profile, detect_vram_bytes, load_profile, with_overrides
from ..planning.budgets import auto_choice, this_card
from ..pipeline.sampling import latent_shape, motion_score_problem, sampling_problem
from .request import first_image
from ..files.video import output_path_error

GiB = 2**30
# Bounds of the request's counts: far above what the model was trained for (the release: 204 frames of 544x992 in
# 30-50 steps), low enough that nothing is allocated or looped over beyond reason before the memory plan runs.
MAX_STEPS = 1000
MAX_FRAMES = 1024
MAX_SIDE = 4096
RELEASE_SIZE = (f"the release makes {RELEASE_PRESET.frames}x{RELEASE_PRESET.height}x{RELEASE_PRESET.width}, "
                "frames x height x width")
# Run options under their old names, still taken for one release (the API's options, a job file the web page's
# queue wrote before): old name -> new name.
OLD_OPTION_NAMES = {"cache": "text_cache", "cache_dir": "text_cache_dir"}


@dataclass
class JobSpec:
    """One video to generate; None means the default (of the profile, the checkpoint or the release)."""
    prompt: str
    negative_prompt: str | None = None
    seed: int = SEED
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    shift: float | None = None
    model_dir: Path | None = None
    demo: bool = False
    profile: str | None = None
    output: Path | None = None
    options: dict = field(default_factory=dict)   # RUN_OPTIONS and profile overrides (attention, vae_tile, ...)
    image: object = None                # TI2V: the first image (a path; the API also takes a PIL image, array, tensor)
    motion_score: float | None = None   # TI2V: how much moves (2 steady, 5 default, 10-20 lively)

    def __post_init__(self):
        self.options = {OLD_OPTION_NAMES.get(k, k): v for k, v in self.options.items()}


def old_option_names(options: dict) -> list[str]:
    """One line per run option given under its old name (taken, see OLD_OPTION_NAMES), naming the new one."""
    return [f"note: option {old!r} is now {new!r} (the old name is taken until the next release)"
            for old, new in OLD_OPTION_NAMES.items() if old in options]


def run_options(spec: JobSpec) -> dict:
    """RUN_OPTIONS with the spec's values."""
    return {k: spec.options.get(k, v) for k, v in RUN_OPTIONS.items()}


def speed_options(spec: JobSpec) -> SpeedOptions:
    options = run_options(spec)
    try:
        return SpeedOptions(cache=options["step_cache"] or SpeedOptions.cache, compile=bool(options["compile"]))
    except ValueError as e:
        raise UsageError(f"--step-cache: {e}") from None


def model_folder(spec: JobSpec, published: bool = False) -> ModelFolder:
    """The spec's folder; the demo is the TI2V one when the spec has a first image (or `demo` is "ti2v"). With
    `published` (planning only), a release named by its hub name that is not on disk opens from its packaged
    shapes."""
    if spec.demo:
        kind = "ti2v" if spec.demo == "ti2v" or spec.image is not None else "t2v"
        return open_model_folder(demo.build_demo_model(kind=kind))
    if spec.model_dir is None:
        raise UsageError("give --model-dir PATH (the downloaded stepvideo-t2v or stepvideo-ti2v folder) or --demo")
    return open_model_folder(spec.model_dir, published)


def profile_name(spec: JobSpec) -> str:
    """The profile a spec runs with: the one given, else cpu for the demo (its tiny model needs no tier), else
    auto. generate.py and the web page both go by this."""
    if spec.profile and spec.profile != "auto":
        return spec.profile
    return "cpu" if spec.demo else "auto"


def check_kind_inputs(spec: JobSpec, folder: ModelFolder) -> None:
    """A first image and a motion score go with a TI2V folder, which needs the image (one-line errors)."""
    if folder.kind == "t2v":
        given = "--image" if spec.image is not None else "--motion-score" if spec.motion_score is not None else None
        if given:
            raise UsageError(f"{given}: {folder.root} is a Step-Video-T2V folder (text to video); image to video "
                             "needs a stepvideo-ti2v folder (or drop the flag)")
        return
    if spec.image is None and spec.options.get("image_latents") is None:
        raise UsageError(f"{folder.root} is a Step-Video-TI2V folder (image to video): give the first image with "
                         "--image PATH (PNG, JPEG or WebP)")
    problem = motion_score_problem(spec.motion_score)
    if problem:
        raise UsageError(problem)


def profile_for(spec: JobSpec, need_device: bool = True, log: Callable[[str], None] | None = None) -> Profile:
    """The spec's profile (profile_name; 'auto': by the card and the RAM, said to `log`) with its overrides; with
    need_device, a CUDA profile on a machine without a GPU is refused here, before anything is allocated."""
    name = profile_name(spec)
    vram = detect_vram_bytes()
    if name == "auto":
        profile, reason = auto_choice(vram, capability=this_card()[1])
        if log:
            log(reason)
    else:
        profile = load_profile(name)
    if need_device and profile.device == "cuda" and vram is None:
        raise UsageError(f"profile {profile.name!r} needs a CUDA GPU and none was found; use --profile cpu "
                         "(slow) or --dry-run to see its memory plan")
    overrides = {k: v for k, v in spec.options.items() if k not in RUN_OPTIONS}
    try:
        return with_overrides(profile, **overrides)
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_numbers(spec: JobSpec) -> None:
    if (not spec.prompt or not spec.prompt.strip()) and spec.options.get("prompt_embeds") is None:
        raise UsageError("--prompt is empty; describe the video to generate, e.g. --prompt \"a cat playing piano\"")
    if spec.steps is not None and not 1 <= spec.steps <= MAX_STEPS:
        raise UsageError(f"--steps {spec.steps}: needs at least 1 denoising step and at most {MAX_STEPS} (release "
                         f"30-{RELEASE_PRESET.steps}, turbo {TURBO_SAMPLING['steps']})")
    if isinstance(spec.seed, bool) or not isinstance(spec.seed, int):
        raise UsageError(f"--seed {spec.seed!r}: must be an integer")
    problem = sampling_problem(spec.guidance_scale, spec.shift, spec.seed)
    if problem:
        raise UsageError(problem)
    every = run_options(spec)["checkpoint_every"]
    if every < 0:
        raise UsageError(f"--checkpoint-every {every}: must be >= 0 (0 = never)")


def preset_for(spec: JobSpec, profile: Profile, default_steps: int | None, log,
               max_frames: int | None = None) -> Preset:
    """The size asked for (the profile's default preset where not given), rounded to what the model makes;
    steps: the spec's, else `default_steps` (turbo), else the preset's. `max_frames` (TI2V's 102): the default
    preset's frames are capped there; asking for more is allowed, with a warning."""
    base = DEMO_PRESET if spec.demo else profile.default_preset
    if max_frames and base.frames > max_frames:
        base = dataclasses.replace(base, frames=max_frames)
    if max_frames and spec.frames and spec.frames > max_frames:
        log(f"warning: --frames {spec.frames}: Step-Video-TI2V makes videos of at most {max_frames} frames (its "
            "reference's length); longer ones are beyond what it was trained for")
    given = {"frames": spec.frames, "height": spec.height, "width": spec.width}
    bad = [f"--{k} {v}" for k, v in given.items() if v is not None and v < 1]
    if bad:
        raise UsageError(f"{bad[0]}: must be positive (frames in multiples of 17, height and width in multiples "
                         f"of 16; {RELEASE_SIZE})")
    frames, height, width = (spec.frames or base.frames, spec.height or base.height, spec.width or base.width)
    if max(height, width) > MAX_SIDE or frames > MAX_FRAMES:
        raise UsageError(f"{frames}x{height}x{width} (frames x height x width) is beyond what the model was trained "
                         f"for ({RELEASE_SIZE}; at most {MAX_FRAMES} frames and {MAX_SIDE} pixels a side here); "
                         "choose a smaller size")
    shape = latent_shape(frames, height, width)
    if shape.rounded:
        log(f"warning: {frames}x{height}x{width} rounded to {shape.num_frames}x{shape.height}x{shape.width} "
            "(frames come in 17-frame chunks, sizes in multiples of 16)")
    steps = spec.steps or default_steps or base.steps
    if not 1 <= steps <= MAX_STEPS:   # a profile file's preset
        raise UsageError(f"{steps} denoising steps (profile {profile.name}): give --steps 1 to {MAX_STEPS}")
    return Preset(shape.num_frames, shape.height, shape.width, steps)


def dry_run_preset(spec: JobSpec, folder: ModelFolder, profile: Profile, turbo: bool, log) -> Preset:
    """The preset --dry-run plans, after the same checks as a run; a TI2V plan needs no first image (it does not
    depend on it), but one given is checked."""
    check_numbers(spec)
    if folder.kind == "t2v" or spec.image is not None:
        check_kind_inputs(spec, folder)
    problem = motion_score_problem(spec.motion_score)
    if problem:
        raise UsageError(problem)
    defaults = sampling_defaults(turbo, folder.kind)
    preset = preset_for(spec, profile, defaults["steps"] if turbo else None, log, defaults.get("max_frames"))
    if spec.image is not None:
        first_image(spec.image, (preset.height, preset.width))
    return preset


def check_writable(path: Path) -> None:
    problem = output_path_error(path, create_dirs=True)
    if problem:
        raise UsageError(problem)


def kernel_target(profile: Profile, par=None) -> tuple[Target, torch.device]:
    """The card the run's kernels run on, and its device (this rank's, in a parallel run)."""
    device = par.device if par is not None else torch.device(profile.device)
    return current_target(device), device


def check_kernels(profile: Profile, weight_format: str | None, par=None) -> None:
    """An explicit attention kernel or `matmul = "fast"` that does not work on this card (engines/probes.py: run
    once on small tensors) is refused here, before any weight is read, naming why and what works instead. In a
    parallel run every rank checks its own card and all stop together."""
    if profile.device != "cuda":
        return           # the CPU: flash and sage are refused with the profile, fast matmuls fall back
    card, device = kernel_target(profile, par)
    problem = probes.explicit_problem(profile, weight_format, card, device)
    if par is not None and not par.all_agree(problem is None) and problem is None:
        problem = "another process of this parallel run cannot run its kernels (its message says why)"
    if problem:
        raise UsageError(problem)
