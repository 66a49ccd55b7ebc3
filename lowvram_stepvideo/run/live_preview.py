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
from ..pipeline.preview import Previewer
from ..pipeline.preview_map import PreviewMap, preview_map_for

Listener = Callable[[dict], None]    # what one preview wrote: path, frames, width, height, bytes, step, seconds


def check_every(every) -> None:
    """A one-line UsageError unless `every` is a whole number of steps >= 0."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise UsageError(f"preview {every!r}: give a whole number of steps between previews, e.g. 5 (0 = off)")


def preview_hook(every: int, path: Path | None, vae_folder: Path, steps: int, listener: Listener,
                 log: Callable[[str], None], preview_map: PreviewMap | None = None) -> PreviewHook | None:
    """The hook for PhasePipeline.preview, or None (previews off, no file to write, or no way to write one: said
    once through `log`). Each preview written goes to `listener`."""
    if not every or path is None:
        return None
    problem = webp_problem()
    if problem:
        log(f"preview: {problem}; the run goes on without previews")
        return None
    try:
        preview_map = preview_map or preview_map_for(vae_folder)
    except (StepVideoError, OSError, RuntimeError) as e:
        log(f"preview: no latent-to-RGB map for {vae_folder} ({e}); the run goes on without previews")
        return None
    previewer = Previewer(path, preview_map, every, steps=steps, log=log)

    def hook(i, latents, velocity, sigma) -> None:
        record = previewer.step(i, latents, velocity, sigma)
        if record is not None:
            listener(record)
    return hook
