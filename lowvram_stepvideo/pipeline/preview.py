"""Watch it form: a small animated preview of the video while it denoises.

Every N steps, the clean latents the current step predicts (one Euler jump from the step's latents and guided
velocity to the end of the schedule, in the scheduler's own convention: x0 = x + (1 - sigma) * v, sigma running
from 0 = noise to 1 = data) go through the VAE's linear preview map (preview_map.py) on the device, are upsampled
to a small size and copied to the host once: that copy is the only synchronisation a preview adds. The frames are
then written as an animated WebP next to the output (files/preview_file.py). Nothing here writes to the latents,
the velocity or any random generator, so the video is the same with and without previews.

One preview frame per latent frame: a chunk of `latent_len` latents stands for `frame_len` video frames, so each
preview frame shows for frame_len / latent_len video frames (227 ms at the release's 17 / 3 and 25 fps) and the
preview lasts as long as the video.

In a denoising loop:

    previewer = Previewer(preview_path(output), preview_map_for(folder / "vae"), every=5, log=log)
    for i in range(start, steps):
        v = guided_velocity(...)
        previewer.step(i, latents, v, sigmas[i])       # before the Euler step replaces the latents
        latents = euler_step(latents, v, sigmas[i], sigmas[i + 1])
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from torch.nn import functional as F

from ..defaults import PREVIEW_LONG_SIDE
from ..files.preview_file import PreviewFileError, write_preview
from .preview_map import PATCH, PreviewMap

VIDEO_FPS = 25               # the reference writer's frame rate


def predicted_clean(latents: torch.Tensor, velocity: torch.Tensor, sigma, sigma_end=1.0) -> torch.Tensor:
    """The clean latents the step predicts, float32: euler_step's update from `sigma` to the schedule's end, dt
    formed the same way (a difference of float32 sigmas), but with dt as a Python number (no copy of a CPU scalar
    to the device, which would wait for it) and one float32 tensor allocated. Sigmas: floats or CPU tensors."""
    dt = float(torch.as_tensor(sigma_end, dtype=torch.float32) - torch.as_tensor(sigma, dtype=torch.float32))
    return torch.add(latents.float(), velocity, alpha=dt)


def preview_size(latent_hw: tuple[int, int], long_side: int = PREVIEW_LONG_SIDE) -> tuple[int, int]:
    """(height, width) of a preview of latents h x w: the video's 16h x 16w scaled so its longer side is
    `long_side`, never larger than the video."""
    h, w = latent_hw[0] * PATCH, latent_hw[1] * PATCH
    scale = min(1.0, long_side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


@torch.inference_mode()
def preview_frames(latents: torch.Tensor, velocity: torch.Tensor, sigma, preview_map: PreviewMap,
                   size: int | tuple[int, int] = PREVIEW_LONG_SIDE, sigma_end=1.0) -> torch.Tensor:
    """Latents and velocity (B, F, z, h, w) on the device -> uint8 frames (F, B*H, W, 3) on the CPU, the batch
    stacked along the height like the video. `size`: the longer side, or (H, W)."""
    return device_frames(latents, velocity, sigma, preview_map, size, sigma_end).cpu()


def device_frames(latents: torch.Tensor, velocity: torch.Tensor, sigma, preview_map: PreviewMap,
                  size: int | tuple[int, int] = PREVIEW_LONG_SIDE, sigma_end=1.0) -> torch.Tensor:
    """preview_frames before the copy to the host: the uint8 frames on the latents' device."""
    if latents.shape != velocity.shape:
        raise ValueError(f"latents {tuple(latents.shape)} and velocity {tuple(velocity.shape)} differ in shape")
    return clean_frames(predicted_clean(latents, velocity, sigma, sigma_end), preview_map, size)


def clean_frames(clean: torch.Tensor, preview_map: PreviewMap,
                 size: int | tuple[int, int] = PREVIEW_LONG_SIDE) -> torch.Tensor:
    """Clean latents (B, F, z, h, w) float32 -> uint8 frames (F, B*H, W, 3) on their device."""
    rgb = preview_map.to_rgb(clean)                                                 # (B, F, 3, h, w) float32
    b, f, _, h, w = rgb.shape
    out_h, out_w = size if isinstance(size, tuple) else preview_size((h, w), size)
    rgb = F.interpolate(rgb.reshape(b * f, 3, h, w), size=(out_h, out_w), mode="bilinear", align_corners=False,
                        antialias=out_h < h or out_w < w)
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)               # (B*F, 3, H, W)
    return pixels.view(b, f, 3, out_h, out_w).permute(1, 0, 3, 4, 2).reshape(f, b * out_h, out_w, 3)


def traced_preview(z_channels: int):
    """A preview hook for the memory plan (planning/plan.py): it makes every step's preview frames on the device
    as a run's preview does (the clean-latent and RGB tensors, the upsampled frames) and drops them, so the plan
    counts their bytes. The map's values do not matter there: a zero map of the right width."""
    zero_map = PreviewMap(torch.zeros(3, z_channels), torch.zeros(3))

    def hook(step, latents, velocity, sigma) -> None:   # dt of 1: a traced sigma has no value to read
        clean_frames(torch.add(latents.float(), velocity, alpha=1.0), zero_map)
    return hook


def frame_durations(latent_frames: int, frame_len: int = 17, latent_len: int = 3,
                    fps: float = VIDEO_FPS) -> list[int]:
    """Milliseconds each preview frame shows: the video's length spread evenly over its latent frames (rounded so
    the total stays the video's). One latent frame is a one-frame video."""
    video_frames = latent_frames // latent_len * frame_len if latent_frames >= latent_len else 1
    total = video_frames * 1000 / fps
    ends = [round(total * (i + 1) / latent_frames) for i in range(latent_frames)]
    return [max(1, e - s) for s, e in zip([0] + ends, ends)]


class Previewer:
    """Writes the preview every `every` steps (after steps every-1, 2*every-1, ... counted from 0, and after the
    last one when `steps` is given), so the file shows the newest prediction. A preview that cannot be written is
    said once through `log` and previews stop; the run goes on. `records` keeps what each preview wrote and
    the seconds it took."""

    def __init__(self, path: Path, preview_map: PreviewMap, every: int, steps: int | None = None,
                 size: int | tuple[int, int] = PREVIEW_LONG_SIDE, frame_len: int = 17, latent_len: int = 3,
                 fps: float = VIDEO_FPS, log: Callable[[str], None] = print):
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"previews come every N steps, N a positive integer; got {every!r}")
        self.path, self.map, self.every, self.steps, self.size = Path(path), preview_map, every, steps, size
        self.timing = (frame_len, latent_len, fps)
        self.log = log
        self.enabled = True
        self.records: list[dict] = []

    def due(self, step: int) -> bool:
        """Whether a preview follows step `step` (0-based)."""
        last = self.steps is not None and step == self.steps - 1
        return self.enabled and ((step + 1) % self.every == 0 or last)

    def step(self, step: int, latents: torch.Tensor, velocity: torch.Tensor, sigma, sigma_end=1.0) -> dict | None:
        """Call once per step with the step's latents and guided velocity, before the Euler step."""
        if not self.due(step):
            return None
        start = time.perf_counter()
        if self.map.weight.device != latents.device:     # once: a copy to the device waits for it
            self.map = self.map.to(latents.device)
        frames = preview_frames(latents, velocity, sigma, self.map, self.size, sigma_end)
        try:
            record = write_preview(self.path, frames, frame_durations(frames.shape[0], *self.timing))
        except PreviewFileError as e:
            self.enabled = False
            self.log(f"preview: {e}; no more previews in this run (the video is not affected)")
            return None
        record.update(step=step + 1, seconds=round(time.perf_counter() - start, 4))
        self.records.append(record)
        return record
