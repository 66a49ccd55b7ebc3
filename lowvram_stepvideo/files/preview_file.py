"""The preview file beside a video being made: an animated WebP, replaced atomically at every preview.

Why WebP and not mp4: Pillow writes it in this process in milliseconds (no ffmpeg started per preview); every
current browser shows and loops it in a plain <img> (no player, no controls), so a web page or a file manager's
image viewer only has to reload one file; and it is small (lossy, a few tens of KB for a 36-frame preview). The
name is the video's plus `.preview.webp` (out.mp4 -> out.mp4.preview.webp), next to its other companions
(out.mp4.json, out.mp4.resume.safetensors). A reader never sees a partial file: each preview is written to a temp
file in the same folder and renamed over the previous one.

libwebp stores consecutive identical frames once, with their durations added, so a reader may count fewer frames
than were written when the picture stood still.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import StepVideoError
from .fsutil import atomic_path

try:
    from PIL import Image, features
except ImportError:          # a dependency (imageio's too); without it there are no previews, the video is unaffected
    Image = features = None

PREVIEW_SUFFIX = ".preview.webp"
QUALITY = 80                 # lossy; the preview is a rough look, the video keeps full quality
METHOD = 1                   # libwebp's speed/size trade-off, 0 (fast) to 6 (small): 1 writes 2-3x faster than the
                             # default 4 for files ~20% larger (bench/preview_cost.py)
MAX_SIDE = 16383             # WebP's limit


class PreviewFileError(StepVideoError, RuntimeError):
    """The preview could not be written (one line: why and what to do); the run itself goes on without it."""


def preview_path(video_path: Path) -> Path:
    """out.mp4 -> out.mp4.preview.webp"""
    video_path = Path(video_path)
    return video_path.with_name(video_path.name + PREVIEW_SUFFIX)


def webp_problem() -> str | None:
    """Why this Python cannot write animated WebP, or None."""
    if Image is None:
        return "Pillow is not installed (pip install pillow)"
    if not features.check("webp"):
        return "this Pillow was built without WebP support (pip install --force-reinstall pillow)"
    return None


def write_preview(path: Path, frames, frame_ms: int | Sequence[int]) -> dict:
    """Write uint8 frames (F, H, W, 3) (a numpy array or a CPU tensor) as a looping animated WebP at `path`,
    atomically. `frame_ms`: how long each frame shows, one value or one per frame. Returns what was written."""
    problem = webp_problem()
    if problem:
        raise PreviewFileError(f"cannot write the preview {path}: {problem}")
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] < 1:
        raise ValueError(f"preview frames must be uint8 (frames, height, width, 3), got {frames.dtype} "
                         f"{frames.shape}")
    count, h, w, _ = frames.shape
    if max(h, w) > MAX_SIDE:
        raise ValueError(f"preview frames of {w}x{h} exceed WebP's {MAX_SIDE} pixels a side")
    durations = [int(frame_ms)] * count if np.isscalar(frame_ms) else [int(d) for d in frame_ms]
    if len(durations) != count or min(durations) < 1:
        raise ValueError(f"need one positive duration per frame ({count}), got {frame_ms!r}")
    images = [Image.fromarray(f) for f in frames]
    path = Path(path)
    try:
        with atomic_path(path, suffix=".webp") as tmp:
            images[0].save(tmp, format="WEBP", save_all=True, append_images=images[1:], duration=durations, loop=0,
                           quality=QUALITY, method=METHOD)
            size = tmp.stat().st_size
    except OSError as e:
        raise PreviewFileError(f"cannot write the preview {path}: {e.strerror or e}") from None
    return {"path": str(path), "frames": count, "width": w, "height": h, "bytes": size}
