"""What one video is made from, as the run holds it: the sampling request, and for Step-Video-TI2V its first image
(validated and fingerprinted before anything heavy runs) and motion score. `Request.fingerprint` is what a resume
checkpoint, saved latents and a finished video's sidecar record and compare."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError
from ..files.images import ImageError, file_sha256, read_image, to_rgb_image
from ..pipeline.conditioning import prepare_first_image
from ..profiles import Preset
from ..files.caches import weights_identity


@dataclass(frozen=True)
class FirstImage:
    """TI2V's first image: a file, or what the API was given (a PIL image, an array, a tensor)."""
    source: object
    label: str            # the file's path, or what kind of object it was
    sha256: str           # of the file's bytes, or of the 8-bit RGB pixels of an in-memory image

    @property
    def path(self) -> Path | None:
        return self.source if isinstance(self.source, Path) else None

    def tensor(self, height: int, width: int) -> torch.Tensor:
        """As the model sees it at this size: float32 (1, 1, 3, H, W) in [-1, 1] (prepare_first_image)."""
        return prepare_first_image(self.source, height, width)


def first_image(given, cover: tuple[int, int]) -> FirstImage:
    """The first image checked (it decodes, it is large enough) and fingerprinted; a one-line UsageError if not.
    `cover` (height, width): the video's size (a huge JPEG is decoded at a scale that still covers it)."""
    try:
        if isinstance(given, (str, Path)):
            path = Path(given).expanduser()
            read_image(path, cover)
            return FirstImage(path, str(path), file_sha256(path))
        rgb = to_rgb_image(given).array()
        digest = hashlib.sha256(f"{rgb.shape}".encode() + rgb.tobytes()).hexdigest()
        return FirstImage(given, f"<{type(given).__name__}>", digest)
    except ImageError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"--image {given}: cannot be read ({e.strerror or e})") from None


def latents_sha256(latents: torch.Tensor) -> str:
    t = latents.detach().float().cpu().contiguous()
    return hashlib.sha256(f"{tuple(t.shape)}".encode() + t.numpy().tobytes()).hexdigest()


@dataclass
class Request:
    prompt: str
    negative_prompt: str | None
    preset: Preset
    guidance_scale: float
    shift: float
    seed: int
    image: FirstImage | None = None              # TI2V: the first image ...
    image_latents: torch.Tensor | None = None    # ... or its sampled latent (1, 1, C, h, w) in its place (API)
    motion_score: float | None = None            # TI2V
    prompt_embeds: tuple | None = None           # API: (y, y_mask, clip) of [cond, uncond] in place of the text phase
    latents: torch.Tensor | None = None          # API: the initial noise (1, T, C, h, w) in place of the seed's

    @property
    def given_tensors(self) -> bool:
        """Latents or image latents were given: they fit this preset's size only."""
        return self.latents is not None or self.image_latents is not None

    def fingerprint(self, model_dir: Path, compute_dtype: str) -> dict:
        """What a resume checkpoint must match: the whole request and the identity of the weights (TI2V: the
        first image's SHA-256 (of its latents when those were given) and the motion score too)."""
        out = {"weights": weights_identity(model_dir), "prompt": self.prompt, "negative_prompt": self.negative_prompt,
               "preset": str(self.preset), "steps": self.preset.steps, "guidance_scale": self.guidance_scale,
               "shift": self.shift, "seed": self.seed, "compute_dtype": compute_dtype}
        if self.image is not None or self.image_latents is not None:
            out["image"] = self.image_sha256()
            out["motion_score"] = self.motion_score
        if self.prompt_embeds is not None:
            out["prompt_embeds"] = "+".join(latents_sha256(t) for t in self.prompt_embeds)
        if self.latents is not None:
            out["latents"] = latents_sha256(self.latents)
        return out

    def describe_image(self) -> dict:
        """The sidecar's record of the first image (empty for T2V)."""
        if self.image is None and self.image_latents is None:
            return {}
        path = str(self.image.path.resolve()) if self.image is not None and self.image.path else None
        given = self.image.label if self.image is not None else "image_latents"
        return {"image": path or given, "image_sha256": self.image_sha256(), "motion_score": self.motion_score}

    def image_sha256(self) -> str:
        return self.image.sha256 if self.image is not None else latents_sha256(self.image_latents)


def check_given(request: Request, latent_shape: tuple[int, ...], caption_channels: tuple[int, int]) -> None:
    """Tensors the API was given in place of a phase's output must fit this request (one-line UsageError)."""
    if request.latents is not None and tuple(request.latents.shape) != latent_shape:
        raise UsageError(f"latents of shape {tuple(request.latents.shape)} do not fit {request.preset}: expected "
                         f"{latent_shape} (batch, latent frames, channels, height / 16, width / 16)")
    want = (1, 1, *latent_shape[2:])
    if request.image_latents is not None and tuple(request.image_latents.shape) != want:
        raise UsageError(f"image_latents of shape {tuple(request.image_latents.shape)} do not fit "
                         f"{request.preset}: expected one latent frame {want}")
    if request.prompt_embeds is not None:
        check_prompt_embeds(request.prompt_embeds, caption_channels)


def check_prompt_embeds(embeds, caption_channels: tuple[int, int]) -> None:
    """(y (2, L, C_llm), y_mask (2, Lc + L), clip (2, Lc, C_clip)), batch = [cond, uncond], as encode_prompt gives."""
    ok = isinstance(embeds, (tuple, list)) and len(embeds) == 3 and all(isinstance(t, torch.Tensor) for t in embeds)
    if ok:
        y, mask, clip = embeds
        ok = (y.dim() == 3 and clip.dim() == 3 and mask.dim() == 2 and y.shape[0] == mask.shape[0] == clip.shape[0] == 2
              and (y.shape[2], clip.shape[2]) == tuple(caption_channels) and mask.shape[1] == clip.shape[1] + y.shape[1])
    if not ok:
        raise UsageError(f"prompt_embeds: expected (y (2, L, {caption_channels[0]}), y_mask (2, 77 + L), clip (2, 77, "
                         f"{caption_channels[1]})) for [prompt, negative prompt], as encode_prompt returns them")
