"""A run's live preview (run option `preview`: every N denoising steps, 0 = off): the pipeline's preview hook
(PhasePipeline.preview) set to a Previewer that writes `OUT.mp4.preview.webp` and tells the run's listeners.

Only the process that writes the video writes the preview (rank 0 of a parallel run), and only when there is a
video file to put it next to. The map from latents to RGB is the VAE folder's (pipeline/preview_map.py: fitted
once per VAE on the CPU and cached); a map that cannot be made costs the run its preview, never the video.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import StepVideoError, UsageError
from ..files.preview_file import webp_problem
from ..pipeline.phases import PreviewHook
from ..pipeline.preview import Previewer, preview_frames
from ..pipeline.preview_map import PreviewMap, preview_map_for

Listener = Callable[[dict], None]    # what one preview wrote: path, frames, width, height, bytes, step, seconds
FramesListener = Callable[[int, object], None]   # (steps done, uint8 frames (F, H, W, 3) on the CPU)


FITTING = ("preview: fitting this VAE's latent-to-RGB map, once (on the CPU; up to a minute or two for the release's "
           "VAE, kept in the cache; quantize.py stores it in the folder)")


def check_every(every) -> None:
    """A one-line UsageError unless `every` is a whole number of steps >= 0."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise UsageError(f"preview {every!r}: give a whole number of steps between previews, e.g. 5 (0 = off)")


def preview_hook(every: int, path: Path | None, vae_folder: Path, steps: int, listener: Listener,
                 log: Callable[[str], None], preview_map: PreviewMap | None = None,
                 frames_listener: FramesListener | None = None) -> PreviewHook | None:
    """The hook for PhasePipeline.preview, or None (previews off, nothing to give them to, or no way to make
    them: said once through `log`). With `path`, each preview is written there and what was written goes to
    `listener`; without, `frames_listener` gets the frames themselves (the Python API, which writes no file)."""
    if not every or (path is None and frames_listener is None):
        return None
    problem = webp_problem() if path is not None else None
    if problem:
        log(f"preview: {problem}; the run goes on without previews")
        return None
    try:
        preview_map = preview_map or preview_map_for(vae_folder, on_fit=lambda: log(FITTING))
    except (StepVideoError, OSError, RuntimeError) as e:
        log(f"preview: no latent-to-RGB map for {vae_folder} ({e}); the run goes on without previews")
        return None
    if path is None:
        return _frames_hook(every, steps, preview_map, frames_listener)
    previewer = Previewer(path, preview_map, every, steps=steps, log=log)

    def hook(i, latents, velocity, sigma) -> None:
        record = previewer.step(i, latents, velocity, sigma)
        if record is not None:
            listener(record)
    return hook


def _frames_hook(every: int, steps: int, preview_map: PreviewMap, listener: FramesListener) -> PreviewHook:
    """Previews at the steps a Previewer writes them, handed over as frames."""
    state = {"map": preview_map}

    def hook(i, latents, velocity, sigma) -> None:
        if (i + 1) % every and i != steps - 1:
            return
        if state["map"].weight.device != latents.device:
            state["map"] = state["map"].to(latents.device)
        listener(i + 1, preview_frames(latents, velocity, sigma, state["map"]))
    return hook
