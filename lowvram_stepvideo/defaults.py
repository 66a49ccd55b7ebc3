"""The one home of every default a run takes when it is not told otherwise: the release's size and sampling
settings and the turbo checkpoint's, the seed, the checkpoint interval, the speed options, the other run options,
the demo's preset and the web page's port. The command line, the web page, the Python API, batches and the
pipeline read them from here; tests/test_defaults.py fails when one of these values is written out as a default
anywhere else in the package.

What belongs to a memory tier (its preset ladder, resident blocks, attention kernel, VAE tile ...) is in its
profile's TOML file instead.
"""
from __future__ import annotations

from dataclasses import dataclass

from .profiles import Preset

SEED = 0                  # seed of the initial noise (0 .. 2**64-1)
CHECKPOINT_EVERY = 5      # save the latents for --resume every N denoising steps (0 = never)
WEB_PORT = 7860           # generate.py --web
WEB_PREVIEW_EVERY = 5     # the web page's live preview: every N denoising steps (the command line's is off: 0)
PREVIEW_LONG_SIDE = 256   # pixels on a live preview's longer side (the video's 992 -> 256, 544 -> 140)

# The release's video: 204 frames (8.2 s at 25 fps) of 544 x 992 pixels (height x width), in 50 steps.
RELEASE_PRESET = Preset(frames=204, height=544, width=992, steps=50)
# Sampling per the release README (docs/STEPVIDEO.md §4). The profiles' presets carry their own steps (50, except
# 12gb/16gb at 30, the release's low end: a step takes minutes on those cards); turbo replaces them with its 15.
RELEASE_SAMPLING = {"steps": RELEASE_PRESET.steps, "guidance_scale": 9.0, "shift": 13.0}
TURBO_SAMPLING = {"steps": 15, "guidance_scale": 5.0, "shift": 17.0}   # the step-distilled checkpoint

# A size the whole pipeline runs on a CPU in seconds: 2 decoded chunks (exercises the chunk blend), 4x6 latents.
DEMO_PRESET = Preset(frames=34, height=64, width=96, steps=4)


# Step-Video-TI2V's own (its reference pipeline, docs/STEPVIDEO.md §3.5): the T2V sampling values, a motion score,
# and videos of at most 102 frames (the ladders of the profiles are capped there unless a user asks for more).
TI2V_SAMPLING = {**RELEASE_SAMPLING, "motion_score": 5.0, "max_frames": 102}
MOTION_SCORE_MAX = 100.0   # the reference suggests 2 (steady) to 10-20 (lively); far beyond is a typo


def sampling_defaults(turbo: bool, kind: str = "t2v") -> dict:
    """steps, guidance_scale and shift of the release, or of the turbo (step-distilled) checkpoint; for a TI2V
    model (`kind` "ti2v") also its motion_score and max_frames (turbo then replaces the sampling values only)."""
    base = TURBO_SAMPLING if turbo else RELEASE_SAMPLING
    return {**TI2V_SAMPLING, **base} if kind == "ti2v" else base


@dataclass(frozen=True)
class SpeedOptions:
    """The denoising phase's options beside the profile (engines/levers.py attaches them); all off by default:
    the exact path."""
    cache: float = 0.0           # first-block step cache threshold (relative change of block 0's residual); 0 = off
    cache_max_reuse: int = 2     # consecutive forwards of one CFG branch that may reuse
    compile: bool = False        # regional torch.compile of the DiT blocks

    def __post_init__(self):
        if isinstance(self.cache, bool) or not isinstance(self.cache, (int, float)) or not 0 <= self.cache < 1:
            raise ValueError(f"cache threshold {self.cache!r} must be a number in [0, 1) (0 = off; try 0.05-0.1)")
        if isinstance(self.cache_max_reuse, bool) or not isinstance(self.cache_max_reuse, int) \
                or self.cache_max_reuse < 1:
            raise ValueError(f"cache_max_reuse {self.cache_max_reuse!r} must be an integer >= 1")


# Options of a job that are not profile overrides (those go to profiles.with_overrides by name).
RUN_OPTIONS = {"resume": False,                       # True: continue from the checkpoint; "auto": when there is one
               "checkpoint_every": CHECKPOINT_EVERY,
               "save_latents": None,                  # also keep the final latents in this file
               "checkpoint": None,                    # the resume checkpoint (default: next to the output)
               "text_cache": True,                    # read and write the text-embedding cache
               "text_cache_dir": None,                # its folder (default: files.text_cache.default_cache_dir())
               "overwrite": False,                    # replace existing outputs (and an earlier run's checkpoint)
               "preview": 0,                          # a live preview every N denoising steps (0 = off)
               "turbo": False,                        # the turbo checkpoint's defaults whatever the folder
               "step_cache": SpeedOptions.cache,      # SpeedOptions.cache
               "compile": SpeedOptions.compile,       # SpeedOptions.compile
               "parallel": None,                      # under torchrun: "cfg" | "sequence" | "auto" (None: auto)
               "prompt_embeds": None,                 # API: (y, y_mask, clip) in place of the text phase
               "latents": None,                       # API: the initial noise in place of the seed's
               "image_latents": None}                 # API, TI2V: the first image's sampled latent
