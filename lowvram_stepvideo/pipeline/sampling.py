"""Flow-matching sampling for Step-Video-T2V: schedule, Euler step, CFG, latent shape, initial noise.

Stateless functions over tensors, following the reference `FlowMatchDiscreteScheduler` and `StepVideoPipeline`
(docs/STEPVIDEO.md §4, §5). Convention: t = 0 is pure noise, t = 1 is data; the DiT predicts a velocity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..defaults import MOTION_SCORE_MAX, RELEASE_SAMPLING, TURBO_SAMPLING

# Default seed of a fresh `torch.Generator()`; the reference pipeline draws its noise from such a generator.
REFERENCE_NOISE_SEED = 67280421310721

# Seeds are 0 .. 2**64-1: torch.Generator.manual_seed also takes negatives but maps them onto the same range
# (-1 gives the video of 2**64-1), so one range is documented and checked.
SEED_MIN, SEED_MAX = 0, 2**64 - 1

def motion_score_problem(score: float | None) -> str | None:
    """Why a motion score cannot be used (one line naming the flag), or None."""
    if score is None:
        return None
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        return f"--motion-score {score}: must be a finite number (2 steady, 5 default, 10-20 lively)"
    if not 0 <= score <= MOTION_SCORE_MAX:
        return (f"--motion-score {score:g}: must be from 0 to {MOTION_SCORE_MAX:g} (2 steady, 5 default, "
                "10-20 lively)")
    return None


def flow_sigmas(num_steps: int, time_shift: float) -> torch.Tensor:
    """Sigmas of the reference scheduler, float32, N+1 values running from 0 (noise) to 1 (data)."""
    if num_steps < 1:
        raise ValueError(f"number of steps must be at least 1, got {num_steps}")
    if not (time_shift > 0 and math.isfinite(time_shift)):
        raise ValueError(f"time shift must be a positive finite number, got {time_shift}")
    u = torch.linspace(1, 0, num_steps + 1, dtype=torch.float32)
    u = time_shift * u / (1 + (time_shift - 1) * u)  # SD3 time shift, float32 like the reference
    return 1 - u


def _release_and_turbo(key: str) -> str:
    """"release 9, turbo 5": the two defaults of a sampling setting, for messages."""
    return f"release {RELEASE_SAMPLING[key]:g}, turbo {TURBO_SAMPLING[key]:g}"


def sampling_problem(guidance_scale: float | None, shift: float | None, seed: int | None) -> str | None:
    """Why these sampling settings would give a broken video (one line naming the flag), or None."""
    if guidance_scale is not None and not math.isfinite(guidance_scale):
        return (f"--cfg {guidance_scale}: the guidance scale must be a finite number "
                f"({_release_and_turbo('guidance_scale')})")
    if guidance_scale is not None and guidance_scale < 0:
        return (f"--cfg {guidance_scale}: a negative guidance scale steers the video towards the negative prompt; "
                f"use 0 (no guidance) to 1 (prompt only) or more ({_release_and_turbo('guidance_scale')})")
    if shift is not None and not (math.isfinite(shift) and shift > 0):
        return f"--shift {shift}: must be a positive finite number ({_release_and_turbo('shift')})"
    if seed is not None and not SEED_MIN <= seed <= SEED_MAX:
        return f"--seed {seed}: seeds go from {SEED_MIN} to 2**64-1 = {SEED_MAX}"
    return None


def flow_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """Timesteps fed to the DiT: every sigma but the last (t0 = 0 exactly)."""
    return sigmas[:-1]


def dit_timestep(t: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """The timestep tensor the DiT receives: t expanded to the batch and cast to the DiT dtype (quirk Q2:
    in bf16 the DiT then computes t*1000 in bf16)."""
    return t.reshape(1).expand(batch).to(dtype)


def euler_step(sample: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One Euler step in float32: sample + velocity * (sigma_next - sigma). Sigmas may be floats or 0-d
    tensors; dt is formed in float32 like the reference (difference of two float32 sigmas)."""
    where = dict(dtype=torch.float32, device=sample.device)   # sigmas staged there already: no copy
    dt = torch.as_tensor(sigma_next, **where) - torch.as_tensor(sigma, **where)
    return sample.float() + velocity.float() * dt


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance uncond + scale * (cond - uncond), in the velocity's own dtype (quirk Q6)."""
    if v_cond.dtype != v_uncond.dtype:
        raise ValueError(f"cond and uncond velocities differ in dtype ({v_cond.dtype} vs {v_uncond.dtype})")
    return v_uncond + scale * (v_cond - v_uncond)


@dataclass(frozen=True)
class LatentShape:
    """The latent tensor shape for a request, and the request after the reference's rounding."""
    shape: tuple[int, int, int, int, int]  # (B, T, C, h, w)
    num_frames: int   # frames actually produced (after rounding down to whole 17-frame chunks, at least 1)
    height: int       # pixels, multiple of the spatial factor
    width: int
    rounded: bool     # True when the request was changed by rounding (a CLI should say so)

    @property
    def tokens(self) -> int:
        """DiT sequence length per sample: T * h * w."""
        _, t, _, h, w = self.shape
        return t * h * w


def latent_shape(num_frames: int, height: int, width: int, batch: int = 1, channels: int = 64,
                 frames_per_chunk: int = 17, latents_per_chunk: int = 3, spatial: int = 16) -> LatentShape:
    """Latent shape as the reference `check_inputs` + `prepare_latents` compute it (§5.3)."""
    for name, value in (("num_frames", num_frames), ("height", height), ("width", width), ("batch", batch)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    frames = max(num_frames // frames_per_chunk * frames_per_chunk, 1)
    h_px = max(height // spatial * spatial, spatial)
    w_px = max(width // spatial * spatial, spatial)
    t = max(frames // frames_per_chunk * latents_per_chunk, 1)
    shape = (batch, t, channels, h_px // spatial, w_px // spatial)
    rounded = (frames, h_px, w_px) != (num_frames, height, width)
    return LatentShape(shape, frames, h_px, w_px, rounded)


def initial_noise(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Standard normal noise drawn on the CPU from a generator seeded with `seed`, so a seed gives the same
    noise on every machine. Default dtype bf16 like the reference (it draws bf16 directly, then the first Euler
    step promotes to float32); with seed REFERENCE_NOISE_SEED this is the reference's noise when it runs on CPU
    (its CUDA noise differs: different generator). Returned on the CPU; move it to the device yourself."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not SEED_MIN <= seed <= SEED_MAX:
        raise ValueError(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}], got {seed!r}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=dtype, device="cpu")
