"""A cheap latent-to-RGB map per VAE, for previews of the video while it denoises (preview.py).

The map is linear: rgb = W @ z + b per latent position (z channels -> 3), in the VAE's pixel range [-1, 1]. It is
fitted by least squares on pairs the VAE itself provides: synthetic images made here (colour fields, gradients,
stripes and checkerboards in random colours and scales, four independent tiles per image), each encoded as one
frame by the folder's encoder (the posterior sample `encode` returns, with a fixed generator), every latent
position paired with the mean colour of its 16x16 patch. A VAE without an encoder (the demo's) is fitted the other
way round: random normal latents of one frame, decoded, each position paired with its decoded patch's mean.
Held-out images (another seed) give the reported error, in 8-bit levels, next to that of the best constant colour.

Fitting loads the encoder alone (110 M parameters at release size; the decoder is never read), in bf16 where the
CPU computes bf16 natively and in float32 elsewhere, and encodes a few images at a time, so memory stays bounded
(peak RSS of the fitting process at release size: 0.7 GiB in bf16, 1.0 GiB in float32); bench/preview_cost.py
measures its time. `preview_map_for` fits once per VAE folder and keeps the result in the cache folder, keyed by
the identity of the folder's files and the fit recipe.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.nn import functional as F

from ..errors import StepVideoError
from ..files.caches import cache_home, model_identity, trim
from ..files.fsutil import atomic_path, files_under
from ..loading.assign import load_weights
from ..loading.loaders import open_vae
from ..models.vae import AutoencoderKL

RECIPE = 1               # bump when the synthetic images or the fit change: cached maps of older recipes are refit
PATCH = 16               # pixels per latent position (the VAE's spatial factor)
# (fit images, held-out images, image size in pixels) per method. The decoder makes 4 frames of every latent frame
# at full resolution before dropping 3: far dearer per pixel than the encoder, so it gets fewer, smaller images
# (it only serves VAEs without an encoder: the demo's).
ENCODER_RECIPE = (32, 8, 128)
DECODER_RECIPE = (16, 8, 32)
FIT_SEED, HELDOUT_SEED = 20240, 97531
BATCH = 4                # images per encoder call: activations stay a few hundred MB at release width
RIDGE = 1e-6             # relative to the mean latent energy; only keeps a degenerate fit (all-zero latents) solvable
LEVELS = 127.5           # [-1, 1] -> 8-bit levels
MAX_CACHED = 64
log = logging.getLogger(__name__)


class PreviewMapError(StepVideoError, ValueError):
    """A stored map cannot be read, or does not fit the latents it is asked to map."""


@dataclass(frozen=True)
class PreviewMap:
    weight: torch.Tensor           # (3, z) float32
    bias: torch.Tensor             # (3,) float32
    info: dict = field(default_factory=dict)   # how it was fitted and its errors (8-bit levels)

    @property
    def z_channels(self) -> int:
        return self.weight.shape[1]

    def to(self, device) -> "PreviewMap":
        return PreviewMap(self.weight.to(device), self.bias.to(device), self.info)

    def to_rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, F, z, h, w) -> (B, F, 3, h, w) float32 on the latents' device, about [-1, 1] (not clamped)."""
        if latents.ndim != 5 or latents.shape[2] != self.z_channels:
            raise PreviewMapError(f"the preview map takes latents (batch, frames, {self.z_channels}, h, w), got "
                                  f"{tuple(latents.shape)}; it was fitted for another VAE")
        weight = self.weight.to(latents.device)
        bias = self.bias.to(latents.device)
        return torch.einsum("bfchw,kc->bfkhw", latents.float(), weight) + bias[:, None, None]

    # -------------------------------------------------------------- storage

    def to_dict(self) -> dict:
        """JSON-safe; float32 values survive the round trip exactly."""
        return {"recipe": RECIPE, "weight": self.weight.cpu().tolist(), "bias": self.bias.cpu().tolist(),
                "info": self.info}

    @classmethod
    def from_dict(cls, data: dict, label: str = "preview map") -> "PreviewMap":
        try:
            weight = torch.tensor(data["weight"], dtype=torch.float32)
            bias = torch.tensor(data["bias"], dtype=torch.float32)
            info = dict(data.get("info", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise PreviewMapError(f"{label}: not a preview map ({e}); delete it to have it fitted again") from None
        if weight.ndim != 2 or weight.shape[0] != 3 or bias.shape != (3,) or not (
                weight.isfinite().all() and bias.isfinite().all()):
            raise PreviewMapError(f"{label}: a preview map holds a finite 3 x z weight and 3 biases, got "
                                  f"{list(weight.shape)} and {list(bias.shape)}; delete it to have it fitted again")
        return cls(weight, bias, info)

    def save(self, path: Path) -> None:
        """Atomic: the file at `path` is always a whole map or absent."""
        with atomic_path(Path(path), suffix=".json") as tmp:
            tmp.write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: Path) -> "PreviewMap":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise PreviewMapError(f"{path}: cannot read the preview map ({e}); delete it to have it fitted "
                                  "again") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def fit(cls, vae: AutoencoderKL, **kwargs) -> "PreviewMap":
        return fit_preview_map(vae, **kwargs)


# ------------------------------------------------------------------ synthetic images

def _colours(n: int, g: torch.Generator) -> torch.Tensor:
    """n random colours, uniform in the RGB cube, in [-1, 1]: (n, 3)."""
    return torch.rand(n, 3, generator=g) * 2 - 1


def _coordinates(size: int, g: torch.Generator) -> torch.Tensor:
    """Pixel positions along a random direction: (size, size)."""
    angle = torch.rand((), generator=g) * math.pi
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    return x * torch.cos(angle) + y * torch.sin(angle)


def _period(g: torch.Generator) -> float:
    """Stripe or cell size, 2 to 64 pixels, log-uniform: from well under a patch to several patches."""
    return float(2 ** (1 + 5 * torch.rand((), generator=g)))


def _tile(kind: str, size: int, g: torch.Generator) -> torch.Tensor:
    """One synthetic tile (3, size, size) in [-1, 1]."""
    a, b = _colours(2, g)
    if kind == "field":
        mix = torch.zeros(size, size)
    elif kind == "gradient":
        t = _coordinates(size, g)
        mix = (t - t.min()) / (t.max() - t.min())
    elif kind == "stripes":
        mix = ((_coordinates(size, g) / _period(g)).floor() % 2)
    else:                                   # checkerboard, axis-aligned, random offset
        cell = _period(g)
        offset = torch.rand(2, generator=g) * cell
        idx = torch.arange(size, dtype=torch.float32)
        mix = (((idx[:, None] + offset[0]) / cell).floor() + ((idx[None, :] + offset[1]) / cell).floor()) % 2
    return a[:, None, None] * (1 - mix) + b[:, None, None] * mix


KINDS = ("field", "gradient", "stripes", "checkerboard")


def synthetic_images(count: int, seed: int, size: int) -> torch.Tensor:
    """(count, 3, size, size) in [-1, 1]: each image four tiles of random kind, colours and scale."""
    g = torch.Generator().manual_seed(seed)
    half = size // 2
    images = torch.empty(count, 3, size, size)
    for i in range(count):
        for r in range(2):
            for c in range(2):
                kind = KINDS[int(torch.randint(len(KINDS), (), generator=g))]
                images[i, :, r * half:(r + 1) * half, c * half:(c + 1) * half] = _tile(kind, half, g)
    return images


def patch_colours(images: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) -> mean colour of every 16x16 patch, (n, 3, H/16, W/16)."""
    return F.avg_pool2d(images.float(), PATCH)


# ------------------------------------------------------------------ pairs and the fit

def encoder_pairs(vae: AutoencoderKL, images: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (N, z), colours (N, 3)): every latent position of the one-frame encodings and its patch colour."""
    g = torch.Generator().manual_seed(seed)
    latents = []
    for batch in images.split(BATCH):
        frames = batch[:, None].to(vae.dtype)                       # (b, 1, 3, H, W): one frame each
        latents.append(vae.encode(frames, generator=g)[:, 0].float())   # (b, z, H/16, W/16)
    return _flatten(torch.cat(latents)), _flatten(patch_colours(images))


def decoder_pairs(vae: AutoencoderKL, count: int, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a VAE without an encoder: random normal one-frame latents and the patch colours of their decoding."""
    g = torch.Generator().manual_seed(seed)
    side = size // PATCH
    latents = torch.randn(count, 1, vae.config.z_channels, side, side, generator=g)
    colours = [patch_colours(vae.decode_chunk(z)[:, 0].float()) for z in latents.split(BATCH)]
    return _flatten(latents[:, 0]), _flatten(torch.cat(colours))


def _flatten(x: torch.Tensor) -> torch.Tensor:
    """(n, c, h, w) -> (n*h*w, c)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def least_squares(latents: torch.Tensor, colours: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (3, z), b (3,) minimising |latents @ W.T + b - colours|^2, in float64, with a ridge on W far below the
    latents' own scale (it only decides a degenerate fit: all-zero latents give W = 0, b = mean colour)."""
    x = latents.double()
    mean_x, mean_y = x.mean(0), colours.double().mean(0)
    xc, yc = x - mean_x, colours.double() - mean_y
    gram = xc.T @ xc
    ridge = RIDGE * float(gram.diagonal().mean()) + 1e-12
    weight = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ yc).T
    bias = mean_y - weight @ mean_x
    return weight.float(), bias.float()


def rms_levels(predicted: torch.Tensor, colours: torch.Tensor) -> float:
    """Root-mean-square error over positions and channels, in 8-bit levels."""
    return float((predicted.double() - colours.double()).pow(2).mean().sqrt()) * LEVELS


@torch.inference_mode()
def fit_preview_map(vae: AutoencoderKL, recipe: tuple[int, int, int] | None = None) -> PreviewMap:
    """Fit the map of `vae` (its encoder if it has one, else its decoder) and measure it on held-out pairs.
    `recipe`: (fit images, held-out images, image size), default ENCODER_RECIPE or DECODER_RECIPE."""
    start = time.perf_counter()
    method = "encoder" if vae.encoder is not None else "decoder"
    fit_images, heldout_images, size = recipe or (ENCODER_RECIPE if method == "encoder" else DECODER_RECIPE)
    if size % PATCH or size < PATCH:
        raise ValueError(f"synthetic images must be a multiple of {PATCH} pixels a side, got {size}")
    if method == "encoder":
        x_fit, y_fit = encoder_pairs(vae, synthetic_images(fit_images, FIT_SEED, size), FIT_SEED)
        x_held, y_held = encoder_pairs(vae, synthetic_images(heldout_images, HELDOUT_SEED, size), HELDOUT_SEED)
    else:
        x_fit, y_fit = decoder_pairs(vae, fit_images, FIT_SEED, size)
        x_held, y_held = decoder_pairs(vae, heldout_images, HELDOUT_SEED, size)
    weight, bias = least_squares(x_fit, y_fit)
    info = {"method": method, "recipe": RECIPE, "dtype": str(vae.dtype).removeprefix("torch."),
            "images": [fit_images, heldout_images], "image_size": size, "pairs": [len(x_fit), len(x_held)],
            "fit_rms_levels": round(rms_levels(x_fit @ weight.T + bias, y_fit), 3),
            "heldout_rms_levels": round(rms_levels(x_held @ weight.T + bias, y_held), 3),
            "constant_rms_levels": round(rms_levels(y_fit.mean(0).expand_as(y_held), y_held), 3),
            "seconds": round(time.perf_counter() - start, 2)}
    return PreviewMap(weight, bias, info)


# ------------------------------------------------------------------ one map per VAE folder

STORED_NAME = "preview_map.json"    # in a quantized folder's vae/, written by quantize.py

def fit_dtype() -> torch.dtype:
    """bf16 where the CPU computes it natively (AVX512-BF16 or AMX: 2.3x faster than float32 on the dev VM, and
    the dtype the release runs its VAE in), float32 elsewhere (bf16 emulated is slower than float32)."""
    native = any(getattr(torch.cpu, name, lambda: False)() for name in
                 ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return torch.bfloat16 if native else torch.float32


def load_fit_vae(vae_folder: Path, dtype: torch.dtype | None = None) -> AutoencoderKL:
    """The folder's VAE as fitting needs it, in `dtype` (default fit_dtype()): with an encoder, only the encoder's
    weights are loaded and the decoder stays on the meta device; without one, the whole decoder is loaded."""
    dtype = dtype or fit_dtype()
    component = open_vae(Path(vae_folder), with_encoder=True)
    vae = component.module
    if vae.encoder is None:
        return component.load(dtype)
    load_weights(vae.encoder, component.source, dtype, _encoder_key)
    vae.decoder.to(dtype)          # still on meta: only `vae.dtype`, which encode() casts its input to, reads it
    return vae.eval()


def _encoder_key(key: str) -> str | None:
    return key.removeprefix("encoder.") if key.startswith("encoder.") else None


def cache_key(vae_folder: Path) -> str:
    return f"r{RECIPE}-{model_identity(files_under(Path(vae_folder)))}"


def store_preview_map(vae_folder: Path) -> PreviewMap | None:
    """Fit the map of a VAE that has an encoder and store it in its folder (STORED_NAME), as quantize.py does for
    its output; None (nothing written) for a VAE without encoder weights, whose map is fitted on first use."""
    vae = load_fit_vae(vae_folder)
    if vae.encoder is None:
        return None
    fitted = fit_preview_map(vae)
    fitted.save(Path(vae_folder) / STORED_NAME)
    return fitted


def preview_map_for(vae_folder: Path, cache_folder: Path | None = None,
                    fit: Callable[[Path], PreviewMap] | None = None,
                    on_fit: Callable[[], None] | None = None) -> PreviewMap:
    """The map of the VAE in `vae_folder`: the one quantize.py stored there (STORED_NAME), else from the cache when
    its files and the recipe are unchanged, else fitted on the CPU (`fit`, default: load the folder's VAE and
    fit_preview_map; `on_fit()` is called first, to say so) and cached. An unreadable entry is refit; a cache
    folder that cannot be written only costs the next run the fit again."""
    stored = Path(vae_folder) / STORED_NAME
    if stored.is_file():
        try:
            return PreviewMap.load(stored)
        except (PreviewMapError, OSError) as e:
            log.warning(f"{stored}: {e}; fitting the preview map again")
    folder = Path(cache_folder) if cache_folder else cache_home() / "preview_maps"
    path = folder / f"{cache_key(vae_folder)}.json"
    if path.is_file():
        try:
            found = PreviewMap.load(path)
            path.touch()                    # the cache keeps the most recently used entries
            return found
        except (PreviewMapError, OSError) as e:
            log.debug(f"preview map cache: {e}")
    if on_fit:
        on_fit()
    fitted = (fit or (lambda f: fit_preview_map(load_fit_vae(f))))(Path(vae_folder))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fitted.save(path)
        trim(folder, "*.json", max_files=MAX_CACHED)
    except OSError as e:
        log.debug(f"preview map cache: cannot write {path}: {e}")
    return fitted
