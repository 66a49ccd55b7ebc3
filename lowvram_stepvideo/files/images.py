"""The first image of Step-Video-TI2V: read from a file (or taken as a PIL image, array or tensor), turned into
8-bit RGB, and preprocessed as the reference does (docs/STEPVIDEO.md §3.5, fixtures/README.md ti2v-public).

Reading: PNG, JPEG, WebP (and BMP, GIF, TIFF); the EXIF orientation is applied; grayscale, palette, CMYK and
16-bit images are converted to 8-bit RGB; transparent pixels are flattened onto white (as a page shows them); an
animated file gives its first frame. Memory stays bounded: at most MAX_DECODED_PIXELS are ever decoded (a larger
JPEG is decoded at 1/2 to 1/8 scale by the JPEG decoder itself, still covering the video; any other larger image is
refused with a one-line error), and a large image is resized a band of rows at a time (`cover_resize`), so no
float copy of the full image exists.

Preprocessing (the reference's): pixels / 255 * 2 - 1, scaled to cover height x width (bilinear with antialiasing,
as torchvision's tensor Resize), then centre cropped.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import StepVideoError

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")   # JPEG's reader also opens MPO (a camera's JPEG pair)
MIN_SIDE = 16                       # the VAE's spatial factor: a smaller image has less than one latent pixel
MAX_DECODED_PIXELS = 64 * 2**20     # 64 Mpx: 192 MiB as RGB, 256 MiB as RGBA
BAND_ROWS = 256                     # rows per band of a large image's horizontal resize
FULL_FLOAT_PIXELS = 4 * 2**20       # above this an image is resized in bands (a float copy would be 48+ MiB)
EXIF_ORIENTATION = 0x0112


class ImageError(StepVideoError, ValueError):
    """A first image that cannot be used; one line naming the problem and the fix."""


@dataclass(frozen=True)
class RGBImage:
    """A decoded image as 8-bit RGB, read a band of rows at a time (so converting it never needs a second full
    copy): `rows(start, stop)` -> uint8 (stop - start, width, 3), possibly read-only."""
    height: int
    width: int
    rows: Callable[[int, int], np.ndarray]

    def array(self) -> np.ndarray:
        return self.rows(0, self.height)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def read_image(path: Path, cover: tuple[int, int] | None = None) -> RGBImage:
    """The image file at `path`, decoded. `cover` (height, width): the size it will be scaled to cover, so that
    a huge JPEG may be decoded at a reduced scale that still covers it."""
    from PIL import Image, UnidentifiedImageError
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"--image {path}: file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # the bound is MAX_DECODED_PIXELS
            with Image.open(path, formats=FORMATS) as img:
                return pil_rgb(_decoded(img, path, cover))
    except UnidentifiedImageError:
        raise ImageError(f"--image {path}: not an image this program reads (PNG, JPEG or WebP; also BMP, GIF, "
                         "TIFF)") from None
    except Image.DecompressionBombError:
        raise ImageError(f"--image {path}: the image is too large to decode (over {MAX_DECODED_PIXELS >> 20} Mpx); "
                         "downscale it first") from None
    except (OSError, SyntaxError, ValueError) as e:   # truncated or corrupt data: PIL raises these
        raise ImageError(f"--image {path}: the image data cannot be decoded ({e}); re-save or re-download it") \
            from None


def _decoded(img, path: Path, cover: tuple[int, int] | None):
    width, height = img.size
    check_size(height, width, f"--image {path}")
    img.seek(0)                                              # an animated file: its first frame
    if width * height > MAX_DECODED_PIXELS:
        if img.format not in ("JPEG", "MPO"):
            raise ImageError(f"--image {path}: {width}x{height} is over the {MAX_DECODED_PIXELS >> 20} Mpx this "
                             f"program decodes of a {img.format} file; downscale it (or save it as JPEG, which "
                             "decodes at a reduced scale)")
        img.draft("RGB", _draft_size(width, height, cover))   # decode at 1/2..1/8 scale, still covering `cover`
        if img.size[0] * img.size[1] > MAX_DECODED_PIXELS:
            raise ImageError(f"--image {path}: {width}x{height} is too large to decode at a scale that fits "
                             f"{MAX_DECODED_PIXELS >> 20} Mpx; downscale it first")
    img.load()
    return img


def _draft_size(width: int, height: int, cover: tuple[int, int] | None) -> tuple[int, int]:
    """The size to ask a reduced-scale JPEG decode for: the least reduction (1/2, 1/4, 1/8) within the decode
    bound that still covers `cover` (height, width) (PIL's JPEG draft takes the largest reduction giving at least
    the size asked)."""
    for reduce in (2, 4, 8):
        small_w, small_h = width // reduce, height // reduce
        if cover and (small_h < cover[0] or small_w < cover[1]):
            break                        # a reduction that would not cover: none that fits (refused after)
        if small_w * small_h <= MAX_DECODED_PIXELS:
            return small_w, small_h
    return width, height


def check_size(height: int, width: int, what: str) -> None:
    if min(height, width) < MIN_SIDE:
        raise ImageError(f"{what}: {width}x{height} pixels is too small; the first image needs at least "
                         f"{MIN_SIDE} pixels on each side (it is scaled to cover the video anyway)")


def pil_rgb(img) -> RGBImage:
    """A (loaded) PIL image as RGBImage: EXIF orientation applied (that one makes a copy), 16-bit and float modes
    scaled to 8 bits, grayscale / palette / CMYK converted, transparency flattened onto white, band by band."""
    from PIL import ImageOps
    if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    width, height = img.size
    return RGBImage(height, width, lambda start, stop: _band_to_rgb(img.crop((0, start, width, stop))))


def _band_to_rgb(band) -> np.ndarray:
    from PIL import Image
    if band.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(band, dtype=np.float64)       # 16-bit values (PNG, TIFF): 65535 -> 255
        band = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    elif band.mode == "F":
        band = Image.fromarray(np.clip(np.rint(np.asarray(band)), 0, 255).astype(np.uint8), "L")
    if band.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (band.mode == "P" and "transparency" in band.info):
        return _flatten_alpha(np.asarray(band.convert("RGBA")))
    return np.asarray(band if band.mode == "RGB" else band.convert("RGB"))


def _flatten_alpha(rgba: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 4) -> (H, W, 3) over a white background."""
    alpha = rgba[..., 3:].astype(np.float32) / 255.0
    return np.rint(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


# ---------------------------------------------------------------- tensors and preprocessing

def to_rgb_image(image) -> RGBImage:
    """What the API takes as a first image (a path, a PIL image, a uint8 array (H, W[, 1|3|4]) or a tensor
    (3, H, W) / (1, 3, H, W): uint8, or float in [0, 1] like torchvision's to_tensor) as an RGBImage."""
    if isinstance(image, (str, Path)):
        return read_image(Path(image))
    if type(image).__module__.startswith("PIL."):
        check_size(image.height, image.width, "image")
        image.load()
        return pil_rgb(image)
    if isinstance(image, torch.Tensor):
        return _array_image(_tensor_to_uint8(image))
    if isinstance(image, np.ndarray):
        return _array_image(_array_to_uint8(image))
    raise ImageError(f"image: expected a file path, a PIL image, a uint8 array or a tensor, got "
                     f"{type(image).__name__}")


def _array_image(rgb: np.ndarray) -> RGBImage:
    check_size(rgb.shape[0], rgb.shape[1], "image")
    return RGBImage(rgb.shape[0], rgb.shape[1], lambda start, stop: rgb[start:stop])


def _array_to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype != np.uint8:
        raise ImageError(f"image: a numpy array must be uint8 (H, W, 3), got {a.dtype}; convert it with "
                         "(a * 255).round().astype('uint8') if it holds values in [0, 1]")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ImageError(f"image: a numpy array must be (H, W), (H, W, 3) or (H, W, 4), got {a.shape}")
    if a.shape[2] == 1:
        return np.repeat(a, 3, axis=2)
    return _flatten_alpha(a) if a.shape[2] == 4 else a


def _tensor_to_uint8(t: torch.Tensor) -> np.ndarray:
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 3 or t.shape[0] != 3:
        raise ImageError(f"image: a tensor must be (3, H, W) or (1, 3, H, W), got {tuple(t.shape)}")
    t = t.detach().cpu()
    if t.dtype == torch.uint8:
        return t.permute(1, 2, 0).contiguous().numpy()
    if not t.is_floating_point():
        raise ImageError(f"image: a tensor must be uint8 or float in [0, 1], got {t.dtype}")
    if not bool(torch.isfinite(t).all()) or float(t.min()) < 0 or float(t.max()) > 1:
        raise ImageError("image: a float tensor must hold values in [0, 1] (torchvision's to_tensor convention); "
                         "for values in [-1, 1] pass (t + 1) / 2")
    return (t.float() * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def cover_geometry(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int, int, int]:
    """(scaled height, scaled width, top, left) of the reference's resize-to-cover and centre crop: the image
    scaled by the factor that makes its tighter side match, sizes rounded to the nearest integer (Python's round,
    like the reference)."""
    scale = target_w / width if width / height < target_w / target_h else target_h / height
    scaled_w, scaled_h = int(round(width * scale)), int(round(height * scale))
    return scaled_h, scaled_w, (scaled_h - target_h) // 2, (scaled_w - target_w) // 2


def preprocess(image: RGBImage, height: int, width: int) -> torch.Tensor:
    """A decoded image -> float32 (1, 1, 3, height, width) in [-1, 1], as the reference computes it."""
    check_size(image.height, image.width, "image")
    sh, sw, top, left = cover_geometry(image.height, image.width, height, width)
    scaled = cover_resize(image, sh, sw)                                # (3, sh, sw) float32 in [-1, 1]
    return scaled[:, top:top + height, left:left + width].contiguous()[None, None]


def _to_unit_range(rgb: np.ndarray) -> torch.Tensor:
    """uint8 (h, W, 3) -> float32 (1, 3, h, W): x / 255 * 2 - 1 (torchvision's to_tensor, then the reference's)."""
    with warnings.catch_warnings():   # a read-only array (PIL's): only read here, into a new float tensor
        warnings.simplefilter("ignore", UserWarning)
        pixels = torch.from_numpy(np.ascontiguousarray(rgb))
    return pixels.permute(2, 0, 1)[None].float().div(255).mul(2).sub(1)


def cover_resize(image: RGBImage, out_h: int, out_w: int, band_rows: int = BAND_ROWS,
                 full_float_pixels: int = FULL_FLOAT_PIXELS) -> torch.Tensor:
    """A decoded image -> float32 (3, out_h, out_w) in [-1, 1], resized bilinearly with antialiasing. A small
    image goes through one interpolate (the reference's path, bit for bit); a large one is resized in width a band
    of rows at a time, then in height (the same separable filter; floats may differ in the last bits), so the
    largest float tensor is (H, out_w) rather than (H, W)."""
    h, w = image.height, image.width
    if h * w <= full_float_pixels or out_w >= w:
        return _interpolate(_to_unit_range(image.array()), out_h, out_w)[0]
    narrow = torch.empty((1, 3, h, out_w), dtype=torch.float32)
    for start in range(0, h, band_rows):
        band = _to_unit_range(image.rows(start, min(start + band_rows, h)))
        narrow[:, :, start:start + band.shape[2]] = _interpolate(band, band.shape[2], out_w)
        del band
    out = torch.empty((3, out_h, out_w), dtype=torch.float32)
    for start in range(0, out_w, band_rows):   # the height pass a band of columns at a time: no second (H, out_w)
        columns = narrow[:, :, :, start:start + band_rows]
        out[:, :, start:start + columns.shape[3]] = _interpolate(columns, out_h, columns.shape[3])[0]
    return out


def _interpolate(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    if tuple(x.shape[-2:]) == (out_h, out_w):
        return x
    return F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=True)
