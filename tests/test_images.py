"""The first image: reading every kind of file a user may give (EXIF orientation, grayscale, RGBA, 16-bit,
palette, animated, huge), the inputs the API takes, and the banded resize of large images."""
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lowvram_stepvideo.files import images
from lowvram_stepvideo.files.images import ImageError, RGBImage, cover_geometry, cover_resize, read_image, to_rgb_image
from lowvram_stepvideo.pipeline.conditioning import prepare_first_image


def _gradient(h=40, w=60):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], axis=-1).astype(np.uint8)


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


def _read(path, **kw):
    return read_image(path, **kw).array()


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("WEBP", ".webp")])
def test_lossless_formats_read_back_exactly(tmp_path, fmt, suffix):
    rgb = _gradient()
    path = _save(Image.fromarray(rgb), tmp_path / f"a{suffix}", format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    assert np.array_equal(_read(path), rgb)


def test_jpeg_reads(tmp_path):
    rgb = _gradient()
    path = _save(Image.fromarray(rgb), tmp_path / "a.jpg", quality=95)
    got = _read(path)
    assert got.shape == rgb.shape and np.abs(got.astype(int) - rgb).mean() < 4


def test_exif_orientation_is_applied(tmp_path):
    rgb = _gradient(40, 60)
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6   # stored landscape, shown rotated 90 degrees clockwise
    path = _save(img, tmp_path / "rotated.png", exif=exif)
    got = _read(path)
    assert got.shape == (60, 40, 3)
    assert np.array_equal(got, np.rot90(rgb, k=-1))


def test_grayscale_and_palette_become_rgb(tmp_path):
    gray = _gradient()[..., 0]
    got = _read(_save(Image.fromarray(gray, "L"), tmp_path / "g.png"))
    assert np.array_equal(got, np.repeat(gray[..., None], 3, axis=2))
    pal = Image.fromarray(_gradient()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    got = _read(_save(pal, tmp_path / "p.png"))
    assert np.array_equal(got, np.asarray(pal.convert("RGB")))


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits(tmp_path):
    values = (np.arange(40 * 60).reshape(40, 60) * 27).astype(np.uint16)   # up to 64773
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    got = _read(path)
    assert np.array_equal(got[..., 0], np.rint(values / 257).astype(np.uint8))


def test_transparency_is_flattened_onto_white(tmp_path):
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, :15, 3] = 255            # left half opaque red, right half fully transparent
    got = _read(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "t.png"))
    assert (got[:, :15] == [200, 0, 0]).all() and (got[:, 15:] == 255).all()
    index = np.zeros((20, 30), np.uint8)
    index[:, 15:] = 1
    pal = Image.fromarray(index, "P")                  # a palette image whose entry 1 is transparent
    pal.putpalette([200, 0, 0, 0, 0, 0])
    pal.info["transparency"] = 1
    got = _read(_save(pal, tmp_path / "tp.png", transparency=1))
    assert (got[:, :15] == [200, 0, 0]).all() and (got[:, 15:] == 255).all()


def test_animated_file_gives_its_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((20, 20, 3), v, np.uint8)) for v in (10, 200)]
    path = tmp_path / "anim.webp"
    frames[0].save(path, save_all=True, append_images=frames[1:], lossless=True, duration=100)
    with Image.open(path) as img:
        assert getattr(img, "n_frames", 1) == 2
    assert (_read(path) == 10).all()


def test_refusals_are_one_line_errors(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    with pytest.raises(ImageError, match="not an image"):
        _read(text)
    with pytest.raises(ImageError, match="not found"):
        _read(tmp_path / "missing.png")
    small = _save(Image.fromarray(_gradient(12, 40)), tmp_path / "small.png")
    with pytest.raises(ImageError, match="too small"):
        _read(small)
    good = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(noise).save(good, format="PNG")
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.getvalue()[:200])
    with pytest.raises(ImageError, match="cannot be decoded"):
        _read(cut)
    for e in (ImageError,):
        assert "\n" not in str(e)


def test_huge_jpeg_is_decoded_at_reduced_scale_within_the_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_DECODED_PIXELS", 100_000)
    path = _save(Image.fromarray(np.tile(_gradient(80, 80), (8, 8, 1))), tmp_path / "huge.jpg", quality=90)  # 640x640
    got = _read(path, cover=(32, 48))
    assert got.shape == (160, 160, 3)      # 1/2 is still over the bound, 1/4 within it and covering 32x48
    with pytest.raises(ImageError, match="too large"):
        _read(path, cover=(600, 600))    # no reduction covers it within the bound


def test_huge_png_is_refused_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_DECODED_PIXELS", 1000)
    path = _save(Image.fromarray(_gradient()), tmp_path / "big.png")
    loaded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loaded.append(1))
    with pytest.raises(ImageError, match="downscale it"):
        _read(path)
    assert not loaded


@pytest.mark.slow
def test_huge_jpeg_decode_holds_bounded_memory(tmp_path):
    """A 12000x12000 JPEG (144 Mpx; decoded in full 576 MB as PIL holds RGB, a float copy 1.7 GB) made into a
    544x992 first image: the process's peak grows by far less (decoded at 1/2 scale, resized in bands)."""
    Image.new("RGB", (12000, 12000), (90, 120, 150)).save(tmp_path / "huge.jpg", quality=80)
    code = ("import resource;import torch;"
            "from lowvram_stepvideo.pipeline.conditioning import prepare_first_image as p;"
            "base=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
            f"t=p(r'{tmp_path / 'huge.jpg'}',544,992);"
            "print(tuple(t.shape), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss-base)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    shape, grown_kib = out.rsplit(" ", 1)
    assert shape == "(1, 1, 3, 544, 992)" and int(grown_kib) * 1024 < 400e6


def test_cover_geometry_is_the_references():
    assert cover_geometry(40, 70, 32, 48) == (32, 56, 0, 4)      # wider: height matches, centre crop in width
    assert cover_geometry(100, 50, 32, 48) == (96, 48, 32, 0)    # taller: width matches
    assert cover_geometry(544, 992, 544, 992) == (544, 992, 0, 0)


def test_banded_resize_equals_the_direct_one():
    rgb = np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8)
    image = RGBImage(300, 500, lambda start, stop: rgb[start:stop])
    direct = cover_resize(image, 96, 160)
    banded = cover_resize(image, 96, 160, band_rows=37, full_float_pixels=0)
    assert (direct - banded).abs().max() <= 1e-5


def test_api_inputs_give_the_same_first_image(tmp_path):
    import lowvram_stepvideo
    assert lowvram_stepvideo.prepare_first_image is prepare_first_image   # the public name
    rgb = _gradient(48, 80)
    path = _save(Image.fromarray(rgb), tmp_path / "x.png")
    want = prepare_first_image(path, 32, 48)
    assert want.shape == (1, 1, 3, 32, 48) and want.min() >= -1 and want.max() <= 1
    for given in (str(path), Image.open(path), rgb, torch.from_numpy(rgb).permute(2, 0, 1),
                  torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255):
        assert torch.equal(prepare_first_image(given, 32, 48), want)
    assert prepare_first_image(path, 40, 50).shape == (1, 1, 3, 32, 48)   # sizes rounded as the model rounds them


def test_api_inputs_refused_with_the_convention():
    with pytest.raises(ImageError, match="uint8"):
        to_rgb_image(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        to_rgb_image(torch.full((3, 32, 32), -0.5))
    with pytest.raises(ImageError, match="too small"):
        to_rgb_image(np.zeros((8, 32, 3), np.uint8))
    with pytest.raises(ImageError, match="expected"):
        to_rgb_image(42)
