"""Denoising checkpoints and saved latents: what a run writes so that its work is never lost or misused.

A resume checkpoint (latents + the index of the next step, saved atomically every N steps) records the full
request and the identity of the weights it came from (per component: file names, sizes, mtimes and the first
64 KiB of each file, as the embedding cache does); resuming under any difference is refused, naming it, because
the result would silently be neither video. Everything read back (step index, latent shape, dtype, finiteness)
is checked against the request. Saved latents (--save-latents) record the same, so --decode-latents can refuse a
resume checkpoint, damaged latents or latents of another VAE.

Both carry a checksum (SHA-256 over the latents' dtype, shape and bytes and over every metadata entry): a file
edited by hand (flipped latent bits, a next step moved forward or back) or damaged on disk is refused, naming it,
instead of silently giving a video that is neither run's. A file without one (written before checksums, or with
it removed) is refused the same way.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..files.caches import weights_identity
from ..errors import StepVideoError
from ..files.fsutil import atomic_path

LATENT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHECKSUM_KEY = "checksum"


class ResumeError(StepVideoError, ValueError):
    pass


class NonFiniteLatents(StepVideoError):
    """The latents became NaN or infinite while denoising."""


def non_finite_latents(step: int, steps: int, ckpt: Path | None) -> NonFiniteLatents:
    """The error for latents that became NaN or infinite at `step` (the denoise's finiteness check found them
    before anything was saved or decoded from them)."""
    kept = (f"the last good checkpoint {ckpt} is kept" if ckpt is not None and Path(ckpt).is_file()
            else "no checkpoint was saved before it")
    return NonFiniteLatents(f"the latents became NaN or infinite at step {step} of {steps}; likely cause: NaN/inf "
                            "in the weights (a corrupt download or quantized folder: re-download or re-quantize) or "
                            f"a numerical overflow (a very large --cfg, or float16 compute); {kept}, no video written")


def checkpoint_path(output: Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".resume.safetensors")


def checksum(latents: torch.Tensor, meta: dict[str, str]) -> str:
    """SHA-256 over the latents (dtype, shape, bytes) and every metadata entry but the checksum itself."""
    h = hashlib.sha256()
    entries = {k: v for k, v in meta.items() if k != CHECKSUM_KEY}
    h.update(json.dumps([str(latents.dtype), list(latents.shape), entries], sort_keys=True).encode())
    h.update(latents.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def signed(latents: torch.Tensor, meta: dict[str, str]) -> dict[str, str]:
    """`meta` with the checksum of the latents and itself."""
    return {**meta, CHECKSUM_KEY: checksum(latents, meta)}


def _write(path: Path, latents: torch.Tensor, meta: dict[str, str], replace: bool) -> None:
    latents = latents.detach().float().cpu().contiguous()
    with atomic_path(path, ".safetensors", replace) as tmp:
        save_file({"latents": latents}, str(tmp), metadata=signed(latents, meta))


def save_checkpoint(path: Path, latents: torch.Tensor, next_step: int, request: dict) -> None:
    _write(path, latents, {"kind": "resume", "next_step": str(next_step),
                           "request": json.dumps(request, sort_keys=True)}, replace=True)


def save_latents(path: Path, latents: torch.Tensor, request: dict, replace: bool = True) -> None:
    """Final latents for --decode-latents, with the request and weights they came from; replace=False:
    FileExistsError rather than replace a file at `path`."""
    _write(path, latents, {"kind": "latents", "request": json.dumps(request, sort_keys=True)}, replace)


def saved_request(path: Path) -> dict | None:
    """The request a checkpoint was saved for, or None when there is no readable checkpoint at `path`."""
    try:
        with safe_open(str(path), "pt") as f:
            saved = json.loads((f.metadata() or {})["request"])
    except (SafetensorError, OSError, KeyError, ValueError, RecursionError):
        return None
    return saved if isinstance(saved, dict) else None


def _read(path: Path, what: str, fix: str) -> tuple[torch.Tensor, dict[str, str]]:
    try:
        latents = load_file(str(path))["latents"]
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as e:
        raise ResumeError(f"{path}: not a {what} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                          f"{fix}") from None
    if CHECKSUM_KEY not in meta:
        raise ResumeError(f"{path}: no checksum (written by an older version, or edited); it cannot be trusted, {fix}")
    if meta[CHECKSUM_KEY] != checksum(latents, meta):
        raise ResumeError(f"{path}: checksum mismatch, the file was changed after it was written (edited by hand or "
                          f"damaged on disk); {fix}")
    return latents, meta


def _request_of(path: Path, meta: dict[str, str], fix: str) -> dict:
    try:
        saved = json.loads(meta["request"])
    except (KeyError, ValueError, RecursionError):
        saved = None
    if not isinstance(saved, dict):
        raise ResumeError(f"{path}: its request metadata is missing or not a JSON object; {fix}")
    return saved


def differences(saved: dict, request: dict) -> list[str]:
    """Names of what differs; for the weights, the components (e.g. 'transformer weights')."""
    diff = []
    for key in sorted(set(saved) | set(request)):
        a, b = saved.get(key), request.get(key)
        if key == "weights" and isinstance(a, dict) and isinstance(b, dict):
            diff += [f"{c} weights" for c in sorted(set(a) | set(b)) if a.get(c) != b.get(c)]
        elif a != b:
            diff.append(f"{key} weights" if key == "weights" else key)
    return diff


def check_latents(path: Path, latents: torch.Tensor, what: str, fix: str) -> None:
    if latents.dtype not in LATENT_DTYPES:
        raise ResumeError(f"{path}: {what} are {str(latents.dtype).removeprefix('torch.')}, not floating point; {fix}")
    if not torch.isfinite(latents).all():
        raise ResumeError(f"{path}: {what} hold NaN or inf values; {fix}")


def load_checkpoint(path: Path, request: dict, shape: tuple[int, ...], steps: int) -> tuple[torch.Tensor, int]:
    """Latents (float32, `shape`) and the index of the next step to run (0..steps); refuses a checkpoint of
    another request or other weights, and one whose contents do not fit the request."""
    path = Path(path)
    fix = "delete it to start fresh (or run with --overwrite)"
    if not path.is_file():
        raise ResumeError(f"nothing to resume: {path} not found (run without --resume to start fresh)")
    latents, meta = _read(path, "resume checkpoint", fix)
    if meta.get("kind") == "latents" or "next_step" not in meta:
        raise ResumeError(f"{path}: not a resume checkpoint (saved latents? decode them with --decode-latents); {fix}")
    saved = _request_of(path, meta, fix)
    diff = differences(saved, request)
    if diff:
        raise ResumeError(f"{path} was saved for different settings ({', '.join(diff)}); "
                          "use the same settings or delete it to start fresh")
    try:
        step = int(meta["next_step"])
    except ValueError:
        step = -1
    if not 0 <= step <= steps:
        raise ResumeError(f"{path}: next step {meta['next_step']!r} is not in 0..{steps}; the file is damaged, {fix}")
    if tuple(latents.shape) != tuple(shape):
        raise ResumeError(f"{path}: latents of shape {tuple(latents.shape)}, the request needs {tuple(shape)}; "
                          f"the file is damaged, {fix}")
    check_latents(path, latents, "its latents", fix)
    return latents.float(), step


def load_latents(path: Path, root: Path, channels: int) -> torch.Tensor:
    """Latents saved with --save-latents, checked: not a resume checkpoint, floating point, finite, one video
    (B = 1) of at least one latent frame with this model's channels, and made for this folder's VAE when the
    file records it."""
    path = Path(path)
    fix = "decode latents written by --save-latents"
    latents, meta = _read(path, "latents file", fix)
    if meta.get("kind") == "resume" or "next_step" in meta:
        raise ResumeError(f"{path} is a resume checkpoint, not saved latents; continue it with the same command "
                          "and --resume")
    if latents.dim() != 5 or latents.shape[0] != 1 or latents.shape[2] != channels or min(latents.shape) < 1:
        raise ResumeError(f"{path}: latents of shape {tuple(latents.shape)} do not fit this model (expected "
                          f"(1, T, {channels}, h, w) with T, h, w >= 1); decode them with the model that made them")
    check_latents(path, latents, "the latents", fix)
    if "request" in meta:
        saved = _request_of(path, meta, fix).get("weights")
        vae = weights_identity(root, ("vae",))["vae"]
        if isinstance(saved, dict) and saved.get("vae") not in (None, vae):
            raise ResumeError(f"{path} was made with other VAE weights than {root}; decode it with the model "
                              "folder that made it")
    return latents
