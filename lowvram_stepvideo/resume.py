"""Denoising checkpoints: latents + step index saved atomically every N steps, so a run can be resumed.

The file records the request that produced it; resuming with a different request is refused, because the
result would silently be neither video.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import StepVideoError
from .fsutil import atomic_path


class ResumeError(StepVideoError, ValueError):
    pass


def checkpoint_path(output: Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".resume.safetensors")


def save_checkpoint(path: Path, latents: torch.Tensor, next_step: int, request: dict) -> None:
    meta = {"next_step": str(next_step), "request": json.dumps(request, sort_keys=True)}
    with atomic_path(path, ".safetensors") as tmp:
        save_file({"latents": latents.detach().float().cpu().contiguous()}, str(tmp), metadata=meta)


def saved_request(path: Path) -> dict | None:
    """The request a checkpoint was saved for, or None when there is no readable checkpoint at `path`."""
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {})["request"])
    except (SafetensorError, OSError, KeyError, ValueError):
        return None


def load_checkpoint(path: Path, request: dict) -> tuple[torch.Tensor, int]:
    """Latents and the index of the next step to run; refuses a checkpoint of another request."""
    path = Path(path)
    if not path.is_file():
        raise ResumeError(f"nothing to resume: {path} not found (run without --resume to start fresh)")
    try:
        latents = load_file(str(path))["latents"]
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        saved, step = json.loads(meta["request"]), int(meta["next_step"])
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise ResumeError(f"{path}: unreadable resume checkpoint ({e}); delete it to start fresh") from None
    diff = sorted(k for k in set(saved) | set(request) if saved.get(k) != request.get(k))
    if diff:
        raise ResumeError(f"{path} was saved for different settings ({', '.join(diff)}); "
                          "use the same settings or delete it to start fresh")
    return latents, step
