"""Decoded video -> uint8 frames (the reference post-processing, docs/STEPVIDEO.md §5.7) -> mp4 file + JSON sidecar.

Files are written atomically (a temp file in the same folder, renamed over the target when complete), so an
interrupted or failed write never leaves a partial file at the output path.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

try:
    import imageio_ffmpeg
except ImportError:          # a dependency; only writing an mp4 needs it (a GPU bench machine may lack it)
    imageio_ffmpeg = None
import numpy as np
import torch

from ..errors import StepVideoError
from .fsutil import new_file, temp_prefix, writable_dir_error

# The reference writer's extra ffmpeg filter (it replaces imageio's own `-vf scale=...`, see §5.7).
REFERENCE_DENOISE = "atadenoise=0a=0.1:0b=0.1:1a=0.1:1b=0.1"
# The index ('moov' box) before the frames: a browser or player starts playing before the whole file arrived.
FAST_START = ["-movflags", "+faststart"]

# Host RAM of the mp4 writer, for memory plans (`mp4_writer_host_bytes`). ffmpeg's peak RSS measured on the dev VM
# (2 vCPU; libx264 crf 25 through write_mp4; random frames, the encoder's worst case; the peak of the encoding and
# the frame-count check): 261 MiB at 34 frames of 256x448, 242 MiB at 51 x 272x480, 298 MiB at 51 x 540x960,
# 374 MiB at 102 x 540x960, 525 MiB at 204 x 540x960. The model below is above all five, by 9-38%. x264 runs more threads on more cores (more frames in flight): a many-core machine needs more.
FFMPEG_BASE_BYTES = 256 * 2**20
FFMPEG_BYTES_PER_PIXEL = 160          # lookahead and reference frames
FFMPEG_BYTES_PER_PIXEL_FRAME = 3      # grows with the clip (buffered encoded frames)


class VideoError(StepVideoError, RuntimeError):
    """The mp4 could not be encoded or written."""


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(B, T, 3, H, W) in [-1, 1] -> uint8 (T, B*H, W, 3), exactly like the reference: clamp(-1, 1), (x + 1) * 127.5
    in the video's dtype, batch stacked along height, clamp(0, 255), truncating cast. Frame by frame on the CPU."""
    if video.dim() != 5 or video.shape[2] != 3:
        raise ValueError(f"expected a decoded video (B, T, 3, H, W), got shape {tuple(video.shape)}")
    b, t, c, h, w = video.shape
    frames = np.empty((t, b * h, w, c), dtype=np.uint8)
    for i in range(t):
        x = (video[:, i].cpu().clamp(-1, 1) + 1) * 127.5  # (B, 3, H, W), each op rounded to the video dtype
        x = x.clamp(0, 255).to(torch.uint8)              # truncation, not rounding
        frames[i] = x.permute(0, 2, 3, 1).reshape(b * h, w, c).numpy()  # (B, H, W, 3) -> (B*H, W, 3)
    return frames


def crop_540p(frames: np.ndarray) -> np.ndarray:
    """The reference centre crop to 540x960 (landscape) or 960x540 (portrait); square frames unchanged.
    Quirk kept on purpose: below 540 (960) pixels the start index is negative and Python slicing counts it from
    the end, e.g. 528x960 -> 6x960 and 200x400 -> 170x280; frames up to 180x320 come out uncropped."""
    _, h, w, _ = frames.shape
    hc, wc = h // 2, w // 2
    if wc > hc:
        return frames[:, hc - 270:hc + 270, wc - 480:wc + 480]
    if wc < hc:
        return frames[:, hc - 480:hc + 480, wc - 270:wc + 270]
    return frames


def postprocess(video: torch.Tensor, crop: bool = True) -> np.ndarray:
    """Decoded video (B, T, 3, H, W) -> uint8 frames (T, H', W', 3) as the reference hands them to the mp4 writer
    (a view into the uncropped frames when cropped)."""
    frames = to_uint8_frames(video)
    return crop_540p(frames) if crop else frames


def written_frame_shape(height: int, width: int) -> tuple[int, int]:
    """(height, width) of the frames `write_mp4` encodes for a decoded video of height x width (after the
    reference crop and the even-side padding)."""
    h, w = crop_540p(np.broadcast_to(np.uint8(0), (1, height, width, 3))).shape[1:3]
    return h + h % 2, w + w % 2


def decoded_video_host_bytes(frames: int, height: int, width: int, dtype: torch.dtype, batch: int = 1) -> int:
    """Host RAM while a decoded video becomes uint8 frames (`postprocess`): the decoded (B, F, 3, H, W) tensor in
    the compute dtype, the uint8 frames (F, B*H, W, 3), and one frame's float temporaries, all alive at once."""
    decoded = batch * frames * 3 * height * width * dtype.itemsize
    return decoded + postprocess_host_bytes(frames, height, width, dtype, batch)


def postprocess_host_bytes(frames: int, height: int, width: int, dtype: torch.dtype, batch: int = 1) -> int:
    """What `postprocess` adds to the decoded video it starts from: the uint8 frames and one frame's temporaries."""
    values = batch * frames * 3 * height * width
    return values + 3 * batch * 3 * height * width * max(dtype.itemsize, 4)


def mp4_writer_host_bytes(frames: int, height: int, width: int) -> int:
    """Host RAM of writing `frames` decoded frames of height x width as mp4 (the uint8 frames themselves are
    counted by `decoded_video_host_bytes`): two frame copies in this process (the even-sided copy, the pipe's
    buffer) plus the ffmpeg process (see FFMPEG_BASE_BYTES)."""
    h, w = written_frame_shape(height, width)
    pixels = h * w
    ffmpeg = FFMPEG_BASE_BYTES + pixels * (FFMPEG_BYTES_PER_PIXEL + FFMPEG_BYTES_PER_PIXEL_FRAME * frames)
    return 2 * 3 * pixels + ffmpeg


def _even(frame: np.ndarray) -> np.ndarray:
    """yuv420p needs even sides: an odd height/width is padded by repeating the last row/column."""
    h, w = frame.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return np.ascontiguousarray(frame)
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _check_frame(frame, shape: tuple[int, ...] | None) -> np.ndarray:
    frame = frame.cpu().numpy() if isinstance(frame, torch.Tensor) else np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3 or (shape and frame.shape != shape):
        want = f"{shape}" if shape else "(H, W, 3)"
        raise ValueError(f"video frames must be uint8 arrays of shape {want}, got {frame.dtype} {frame.shape}")
    return frame


def _encode(tmp: Path, frames: Iterable, first: np.ndarray, fps: float, params: list[str]) -> int:
    """Stream frames into ffmpeg (libx264, yuv420p) writing `tmp`; returns the number of frames sent."""
    h, w = first.shape[:2]
    if imageio_ffmpeg is None:
        raise VideoError("cannot write an mp4: imageio-ffmpeg is not installed (pip install imageio-ffmpeg)")
    writer = imageio_ffmpeg.write_frames(str(tmp), (w + w % 2, h + h % 2), fps=fps, codec="libx264", quality=None,
                                         pix_fmt_out="yuv420p", macro_block_size=1, ffmpeg_log_level="error",
                                         output_params=params)
    count = 0
    try:
        writer.send(None)  # starts ffmpeg
        for frame in itertools.chain([first], frames):
            writer.send(_even(_check_frame(frame, first.shape)))
            count += 1
    finally:
        writer.close()  # waits for ffmpeg to finish the file
    return count


def write_mp4(frames: np.ndarray | Iterable, path: Path, fps: float = 25, crf: int = 25,
              denoise: bool = True, replace: bool = True, next_name: Callable[[Path], Path] | None = None) -> dict:
    """Write uint8 frames (T, H, W, 3), or an iterable of (H, W, 3) frames, as an H.264 yuv420p mp4, atomically.

    Like the reference writer: libx264, crf 25, 25 fps, and (denoise=True) its atadenoise filter. Odd heights or
    widths are padded by one repeated row/column (yuv420p needs even sides). The file is fast-start (index
    first). Returns what was written: {"path", "frames", "width", "height", "fps", "padded"}. Encoding errors raise
    VideoError; nothing is left at `path` (an existing file there stays untouched). replace=False: a file at `path`
    is never replaced, even one another process puts there while this one encodes: the video goes to
    `next_name(path)` when given (see fsutil.new_file), else FileExistsError."""
    path = Path(path)
    if not (isinstance(crf, int) and 0 <= crf <= 51) or not fps > 0:
        raise ValueError(f"mp4 settings out of range: crf {crf!r} (0-51), fps {fps!r} (> 0)")
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError(f"no frames to write to {path}")
    first = _check_frame(first, None)
    params = ["-crf", str(crf), *FAST_START] + (["-vf", REFERENCE_DENOISE] if denoise else []) + ["-f", "mp4"]
    try:
        with new_file(path, ".mp4", replace, next_name) as out:
            count = _encode(out.tmp, frames, first, fps, params)
            written, _ = imageio_ffmpeg.count_frames_and_secs(str(out.tmp))  # ffmpeg's exit status is not reported
            if written != count:
                raise VideoError(f"ffmpeg wrote {written} of {count} frames")
    except FileExistsError:
        raise
    except (OSError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0].rstrip(": ") if str(e).strip() else type(e).__name__
        raise VideoError(f"could not write {path}: {msg} (ffmpeg prints the cause above)") from e
    h, w = first.shape[:2]
    return {"path": str(out.path), "frames": count, "width": w + w % 2, "height": h + h % 2, "fps": fps,
            "padded": bool(h % 2 or w % 2)}


def sidecar_path(video_path: Path) -> Path:
    """Where the metadata of a video goes: next to it, `<name>.json` appended (out.mp4 -> out.mp4.json)."""
    video_path = Path(video_path)
    return video_path.with_name(video_path.name + ".json")


def write_sidecar(path: Path, data: dict, replace: bool = True) -> Path:
    """Write `data` as strict UTF-8 JSON atomically (paths and other objects as strings). A NaN or infinity is
    refused before anything is written (strict JSON readers reject them); a failed write is a VideoError and
    leaves any earlier file at `path` as it was. replace=False: FileExistsError rather than replace a file."""
    try:
        text = json.dumps(data, indent=2, ensure_ascii=False, default=str, allow_nan=False) + "\n"
    except ValueError as e:
        if "Out of range float" not in str(e):
            raise
        bad = ", ".join(non_finite_keys(data))
        raise VideoError(f"not writing {path}: {bad} is not a finite number (strict JSON has no NaN or "
                         "infinity)") from None
    try:
        with new_file(Path(path), ".json", replace) as out:
            out.tmp.write_text(text, encoding="utf-8")
    except FileExistsError:
        raise
    except OSError as e:
        raise VideoError(f"could not write {path}: {e.strerror or e}") from None
    return Path(path)


def non_finite_keys(data, where: str = "") -> list[str]:
    """Dotted keys of the floats in nested dicts/lists that are NaN or infinite."""
    if isinstance(data, float):
        return [] if math.isfinite(data) else [where or "value"]
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, (list, tuple)) else []
    return [k for key, v in items for k in non_finite_keys(v, f"{where}.{key}" if where else str(key))]


def output_path_error(path: Path, create_dirs: bool = False) -> str | None:
    """One-line reason why a file cannot be written at `path`, or None; call it before heavy work starts.
    With create_dirs the missing parent folders are created first. Really creates (and deletes) a probe file,
    so read-only file systems and permission rules that `os.access` does not see are caught too."""
    parent = Path(path).resolve().parent
    if parent.exists() and not parent.is_dir():
        return f"cannot write {path}: {parent} is a file, not a folder (choose another --output)"
    if create_dirs and not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return f"cannot create folder {parent} for {path}: {e.strerror or e} (choose another --output)"
    problem = writable_dir_error(Path(path))
    if problem:
        return problem
    try:
        fd, probe = tempfile.mkstemp(prefix=temp_prefix(Path(path)), suffix=".probe.tmp", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"cannot write {path}: {parent} is not writable ({e.strerror or e}); choose another --output"
    return None
