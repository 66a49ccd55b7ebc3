"""What a finished job leaves: the mp4 and its JSON sidecar (what was asked, what ran, on which weights), and
whether an existing video already is the result of a request (so a rerun of a batch can skip it)."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from . import preflight
from ..profiles import describe
from ..files.video import sidecar_path
from ..files.video import write_mp4, write_sidecar


def job_metadata(job, request) -> dict:
    """The sidecar's description of what was asked and what ran (`request`: after any step-down); 'request' is
    what a rerun compares (see is_finished)."""
    spec, preset = job.spec, request.preset
    return {"prompt": spec.prompt, "negative_prompt": spec.negative_prompt, "seed": spec.seed,
            "preset": str(preset), "steps": preset.steps, "guidance_scale": request.guidance_scale,
            "shift": request.shift, "turbo": job.turbo, "arguments": spec_arguments(spec),
            "request": job.request.fingerprint(job.pipe.folder.root, job.pipe.profile.compute_dtype),
            "parallel": job.par.layout.describe() if job.par else None, "kind": job.pipe.kind,
            **request.describe_image()}


def spec_arguments(spec: preflight.JobSpec) -> dict:
    plain = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}   # (asdict would copy an image)
    options = plain.pop("options")
    return {k: _plain(v) for k, v in {**plain, **preflight.run_options(spec), **options}.items()}


def _plain(value):
    """A JSON value for the sidecar: numbers as they are, an in-memory image or tensors (the API's) as their type,
    anything else as text."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    tensors = value if isinstance(value, (tuple, list)) else [value]
    if any(hasattr(v, "shape") or hasattr(v, "mode") for v in tensors):
        return f"<{type(value).__name__}>"
    return str(value)


def write_outputs(output: Path, frames, pipe, meta: dict, seconds: float, log) -> None:
    info = write_mp4(frames, output)
    if info.get("padded"):
        log("note: odd frame size padded by one pixel for H.264 (yuv420p needs even sizes)")
    meta = {**meta, "model_dir": str(pipe.folder.root), "weight_format": pipe.folder.weight_format,
            "frames": int(frames.shape[0]), "size": [int(frames.shape[1]), int(frames.shape[2])],
            "fps": info["fps"], "width": info["width"], "height": info["height"],   # of the mp4 as written
            "duration_s": round(info["frames"] / info["fps"], 3),
            "profile": describe(pipe.profile), "speed": pipe.speed, "timings_s": {k: round(v, 2) for k, v in pipe.timings.items()},
            "total_s": round(seconds, 2), "peak_vram_bytes": _peak_vram(pipe.device),
            "peak_host_bytes": _peak_host(), "torch": torch.__version__}
    write_sidecar(sidecar_path(output), meta)
    log(f"wrote {output.resolve()} ({meta['frames']} frames, {info['width']}x{info['height']}, {info['fps']} fps) "
        f"and {sidecar_path(output).resolve()}")


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


def finished_sidecar(output: Path, request: dict) -> dict | None:
    """The sidecar of `output` when the video and its sidecar exist and were made for `request` (the resume
    fingerprint of the request as asked, which holds the identity of the weights); None otherwise."""
    try:
        meta = json.loads(sidecar_path(output).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not Path(output).is_file():
        return None
    return meta if meta.get("request") == request else None
