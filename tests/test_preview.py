"""Previews while denoising: the latent-to-RGB map (its fit, storage and cache), the preview frames, the WebP file
and its atomic replacement, the every-N-steps writer, and that previews leave the video unchanged."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FIXTURES, complete_model_dir, read_io
from lowvram_stepvideo.files import preview_file
from lowvram_stepvideo.files.preview_file import PreviewFileError, preview_path, write_preview
from lowvram_stepvideo.loading.loaders import open_vae
from lowvram_stepvideo.pipeline import preview_map as pm
from lowvram_stepvideo.pipeline.phases import PhasePipeline
from lowvram_stepvideo.pipeline.preview import (
    Previewer,
    frame_durations,
    predicted_clean,
    preview_frames,
    preview_size)
from lowvram_stepvideo.pipeline.preview_map import PreviewMap, PreviewMapError
from lowvram_stepvideo.pipeline.sampling import euler_step, flow_sigmas

ENCODER_VAE = FIXTURES / "ti2v-public" / "model_dir" / "vae"     # the fixture VAE that has an encoder (z 4)


def random_map(z: int = 4, seed: int = 0) -> PreviewMap:
    g = torch.Generator().manual_seed(seed)
    return PreviewMap(torch.randn(3, z, generator=g) * 0.3, torch.randn(3, generator=g) * 0.1)


def wrong_maps(good: PreviewMap) -> dict[str, PreviewMap]:
    """Maps a broken fit could produce: nothing learned, the sign flipped, colour channels swapped."""
    return {"zero": PreviewMap(torch.zeros_like(good.weight), torch.zeros_like(good.bias)),
            "negated": PreviewMap(-good.weight, -good.bias),
            "channels swapped": PreviewMap(good.weight[[2, 0, 1]], good.bias[[2, 0, 1]])}


def map_error(m: PreviewMap, latents: torch.Tensor, colours: torch.Tensor) -> float:
    return pm.rms_levels(latents @ m.weight.T + m.bias, colours)


# ------------------------------------------------------------------ the fit

def test_least_squares_recovers_a_planted_map():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 8, generator=g) * 2 + 0.5
    w, b = torch.randn(3, 8, generator=g), torch.randn(3, generator=g)
    y = x @ w.T + b + torch.randn(2000, 3, generator=g) * 1e-3
    weight, bias = pm.least_squares(x, y)
    torch.testing.assert_close(weight, w, atol=1e-3, rtol=0)
    torch.testing.assert_close(bias, b, atol=1e-3, rtol=0)
    exact = torch.linalg.lstsq(torch.cat([x, torch.ones(2000, 1)], 1).double(), y.double()).solution.T.float()
    torch.testing.assert_close(weight, exact[:, :8], atol=1e-5, rtol=0)   # the ridge does not move a sound fit


def test_all_zero_latents_give_the_mean_colour():
    """A VAE whose latents carry nothing (the zero-weight release used for timing) still gets a finite map."""
    y = torch.rand(100, 3) * 2 - 1
    weight, bias = pm.least_squares(torch.zeros(100, 64), y)
    assert torch.equal(weight, torch.zeros(3, 64))
    torch.testing.assert_close(bias, y.mean(0))


def test_synthetic_images_are_fixed_by_their_seed_and_varied():
    a, b = pm.synthetic_images(8, 5, 64), pm.synthetic_images(8, 5, 64)
    assert torch.equal(a, b) and a.shape == (8, 3, 64, 64)
    assert not torch.equal(a, pm.synthetic_images(8, 6, 64))
    assert a.min() >= -1 and a.max() <= 1
    colours = pm.patch_colours(pm.synthetic_images(64, 5, 128))      # (64, 3, 8, 8)
    assert colours.std(dim=(0, 2, 3)).min() > 0.4                     # every channel spans much of its range
    assert (colours.amax(dim=1) - colours.amin(dim=1)).mean() > 0.3   # and the colours are not greys


def test_fit_recovers_colours_through_a_planted_encoder():
    """An encoder whose latents are a known linear function of each patch's colour (plus noise): the fit must
    undo it, so a pairing of latents with the wrong patches, frames or channels would show here."""
    vae = open_vae(ENCODER_VAE, with_encoder=True).load(torch.float32)
    mix = torch.tensor([[1.0, 0.2, -0.3], [0.1, -0.8, 0.4], [0.5, 0.5, 0.9], [-0.7, 0.3, 0.2]])   # colour -> z 4

    def planted_encode(frames, generator=None):          # (b, 1, 3, H, W) -> (b, 1, 4, H/16, W/16)
        colour = pm.patch_colours(frames[:, 0])
        noise = torch.randn(colour.shape[0], 4, *colour.shape[2:], generator=generator) * 0.01
        return (torch.einsum("zc,bchw->bzhw", mix, colour) + noise)[:, None]

    vae.encode = planted_encode
    fitted = pm.fit_preview_map(vae, recipe=(8, 4, 128))
    assert fitted.info["method"] == "encoder" and fitted.info["pairs"] == [8 * 64, 4 * 64]
    assert fitted.info["heldout_rms_levels"] < 2.0        # measured 1.2 (the noise); latents paired transposed: 54.6
    assert fitted.info["constant_rms_levels"] > 40


def test_encoder_fit_on_the_fixture_vae():
    """The fixture VAE's own encoder, loaded as preview_map_for loads it (its decoder left on meta). Its weights
    are random: with each frame's GroupNorm statistics taken out at every level, its latents hold almost no
    colour (correlations with the patch colours below 0.2), so no linear map beats the best constant colour by
    much on it (default recipe, float32 or bf16: held-out 60.75 levels, the fit set's mean colour 60.84, plain
    grey 60.71). What can be checked here is the machinery on real encoder pairs: the map is their least-squares
    optimum and the reported errors are theirs. The fit's quality is tested through the planted encoder above and
    on the fixture's decoder below."""
    vae = pm.load_fit_vae(ENCODER_VAE)
    assert vae.decoder.conv_in.conv.weight.is_meta and not vae.encoder.conv_in.conv.weight.is_meta
    recipe = (8, 4, 64)
    fitted = pm.fit_preview_map(vae, recipe)
    assert fitted.info["method"] == "encoder" and fitted.info["pairs"] == [8 * 16, 4 * 16]
    x, y = pm.encoder_pairs(vae, pm.synthetic_images(recipe[0], pm.FIT_SEED, recipe[2]), pm.FIT_SEED)
    assert torch.equal(pm.least_squares(x, y)[0], fitted.weight)       # the same pairs again: fixed seeds
    assert fitted.info["fit_rms_levels"] == pytest.approx(map_error(fitted, x, y), abs=1e-3)
    constant = PreviewMap(torch.zeros_like(fitted.weight), y.mean(0))
    for name, other in {"constant": constant, **wrong_maps(fitted)}.items():
        assert map_error(other, x, y) > map_error(fitted, x, y), name
    assert np.isfinite(fitted.info["heldout_rms_levels"]) and fitted.info["heldout_rms_levels"] < 80


def test_decoder_fit_reproduces_decoded_patch_colours_on_the_fixture_vae():
    """A VAE without an encoder (the demo's) is fitted on its decoder. The fixture decoder's colours follow its
    latents partly linearly (its parameter-free channel-duplicating shortcuts carry them up): measured held-out
    error 32.6 levels against 43.5 for the best constant colour. Bound 37; every broken map misses it."""
    vae = open_vae(FIXTURES / "tiny-public" / "model_dir" / "vae", with_encoder=False).load(torch.float32)
    recipe = (12, 6, 32)
    fitted = pm.fit_preview_map(vae, recipe)
    info = fitted.info
    assert info["method"] == "decoder" and info["pairs"] == [12 * 4, 6 * 4]
    assert info["heldout_rms_levels"] <= 37.0
    assert info["constant_rms_levels"] > 37.0
    x_held, y_held = pm.decoder_pairs(vae, recipe[1], pm.HELDOUT_SEED, recipe[2])
    assert info["heldout_rms_levels"] == pytest.approx(map_error(fitted, x_held, y_held), abs=1e-3)
    for name, wrong in wrong_maps(fitted).items():
        assert map_error(wrong, x_held, y_held) > 37.0, name


# ------------------------------------------------------------------ storage and cache

def test_map_round_trips_exactly_through_json(tmp_path):
    m = PreviewMap(torch.randn(3, 64), torch.randn(3), {"method": "encoder", "heldout_rms_levels": 12.5})
    path = tmp_path / "map.json"
    m.save(path)
    back = PreviewMap.load(path)
    assert torch.equal(back.weight, m.weight) and torch.equal(back.bias, m.bias) and back.info == m.info
    assert torch.equal(PreviewMap.from_dict(json.loads(json.dumps(m.to_dict()))).weight, m.weight)


@pytest.mark.parametrize("content", ["{not json", '{"weight": [[1, 2]], "bias": [0, 0, 0]}',
                                     '{"weight": [[1], [2], [NaN]], "bias": [0, 0, 0]}', '[]'])
def test_a_damaged_map_file_is_one_line_error(tmp_path, content):
    path = tmp_path / "map.json"
    path.write_text(content)
    with pytest.raises(PreviewMapError) as e:
        PreviewMap.load(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_map_refuses_latents_of_another_vae():
    with pytest.raises(PreviewMapError, match="64, h, w"):
        random_map(64).to_rgb(torch.zeros(1, 2, 4, 3, 3))


def test_cache_fits_once_per_vae_folder_identity(tmp_path):
    vae = tmp_path / "vae"
    shutil.copytree(ENCODER_VAE, vae)
    cache = tmp_path / "cache"
    fits = []

    def fake_fit(folder):
        fits.append(folder)
        return random_map(seed=len(fits))

    said = []
    first = pm.preview_map_for(vae, cache, fit=fake_fit, on_fit=lambda: said.append(len(fits)))
    again = pm.preview_map_for(vae, cache, fit=fake_fit, on_fit=lambda: said.append(len(fits)))
    assert len(fits) == 1 and torch.equal(first.weight, again.weight)
    assert said == [0]                                     # said before the one fit, not on the cached read
    assert len(list(cache.glob("*.json"))) == 1 and not list(cache.glob(".*"))

    config = vae / "config.json"                          # another VAE in the same place: refit
    config.write_text(config.read_text().replace('"note"', '"note2"'))
    changed = pm.preview_map_for(vae, cache, fit=fake_fit)
    assert len(fits) == 2 and not torch.equal(changed.weight, first.weight)

    for entry in cache.glob("*.json"):                    # a damaged entry is refit, not an error
        entry.write_text("{")
    pm.preview_map_for(vae, cache, fit=fake_fit)
    assert len(fits) == 3


def test_cache_default_fit_on_the_fixture_vae(tmp_path, monkeypatch):
    """Without a fit function the folder's VAE is loaded and fitted (a small recipe here, for time)."""
    monkeypatch.setattr(pm, "ENCODER_RECIPE", (4, 4, 64))
    fitted = pm.preview_map_for(ENCODER_VAE, tmp_path)
    assert fitted.info["method"] == "encoder" and fitted.info["images"] == [4, 4] and fitted.z_channels == 4
    cached = PreviewMap.load(next(tmp_path.glob("*.json")))
    assert torch.equal(cached.weight, fitted.weight)


# ------------------------------------------------------------------ frames

def test_predicted_clean_is_the_euler_jump_to_the_data_end():
    """Convention of the scheduler (STEPVIDEO.md §4): sigma 0 = noise, 1 = data, x_sigma = sigma data +
    (1 - sigma) noise, velocity data - noise; the jump to sigma 1 gives back the data."""
    g = torch.Generator().manual_seed(3)
    data, noise = torch.randn(1, 3, 4, 5, 6, generator=g), torch.randn(1, 3, 4, 5, 6, generator=g)
    for sigma in (0.0, 0.3, 0.9):
        x = sigma * data + (1 - sigma) * noise
        torch.testing.assert_close(predicted_clean(x, data - noise, sigma), data, atol=1e-5, rtol=0)
    sigmas = flow_sigmas(5, 13.0)
    assert float(sigmas[-1]) == 1.0
    x, v = torch.randn(1, 3, 4, 5, 6, generator=g), torch.randn(1, 3, 4, 5, 6, generator=g)
    torch.testing.assert_close(predicted_clean(x, v.bfloat16(), sigmas[-2]),      # the loop's bf16 velocity
                               euler_step(x, v.bfloat16(), sigmas[-2], sigmas[-1]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape, size, expected", [
    ((1, 36, 64, 34, 62), 256, (36, 140, 256)),    # the release's 204 x 544 x 992
    ((1, 6, 4, 2, 3), 256, (6, 32, 48)),           # smaller than 256: the video's own size
    ((2, 3, 4, 4, 6), 48, (3, 2 * 32, 48)),        # two videos stacked along the height
    ((1, 1, 4, 8, 4), (20, 10), (1, 20, 10)),      # one frame, an explicit size
])
def test_preview_frames_count_and_size(shape, size, expected):
    g = torch.Generator().manual_seed(0)
    latents, velocity = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    before = (latents.clone(), velocity.clone())
    frames = preview_frames(latents, velocity, 0.4, random_map(shape[2]), size)
    assert frames.dtype == torch.uint8 and frames.device.type == "cpu"
    assert tuple(frames.shape) == (*expected, 3)
    assert torch.equal(latents, before[0]) and torch.equal(velocity, before[1])   # inputs untouched


def test_preview_frames_show_the_mapped_colours():
    """Flat latents per frame and batch entry: every pixel shows the map's colour of the predicted latents."""
    m = PreviewMap(torch.tensor([[0.5, 0.0], [0.0, -0.5], [0.25, 0.25]]), torch.tensor([0.0, 0.1, -0.2]))
    x0 = torch.tensor([[[0.2, 0.4], [1.0, -1.0]], [[-0.6, 0.8], [0.0, 0.0]]])      # (B 2, F 2, z 2)
    x0 = x0[..., None, None].expand(2, 2, 2, 3, 5).contiguous()
    v = torch.randn_like(x0)
    sigma = 0.25
    frames = preview_frames(x0 - (1 - sigma) * v, v, sigma, m, (12, 20))              # (F 2, 2*12, 20, 3)
    expected = (x0[..., 0, 0] @ m.weight.T + m.bias).clamp(-1, 1)                     # (B, F, 3)
    expected = ((expected + 1) * 127.5).round()
    for b in range(2):
        for f in range(2):
            block = frames[f, b * 12:(b + 1) * 12].float()
            assert (block - expected[b, f]).abs().max() <= 1, (b, f)


def test_preview_size_never_exceeds_the_video():
    assert preview_size((34, 62)) == (140, 256)
    assert preview_size((48, 48)) == (256, 256)
    assert preview_size((2, 3), 1000) == (32, 48)


def test_frame_durations_spread_the_video_length():
    d = frame_durations(36)
    assert len(d) == 36 and sum(d) == 204 * 40 and max(d) - min(d) <= 1     # 204 frames at 25 fps
    assert frame_durations(1) == [40]
    assert sum(frame_durations(6)) == 34 * 40


# ------------------------------------------------------------------ the file

def _frames(count: int, h: int = 24, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, h, w, 3), dtype=np.uint8)


def _read(path):
    with Image.open(path) as im:
        durations = []
        for i in range(im.n_frames):
            im.seek(i)
            im.load()                                     # Pillow sets a WebP frame's duration when it decodes it
            durations.append(im.info["duration"])
        return im.format, im.n_frames, im.size, durations


def test_write_preview_writes_an_animated_webp(tmp_path):
    path = preview_path(tmp_path / "out.mp4")
    assert path.name == "out.mp4.preview.webp"
    record = write_preview(path, torch.from_numpy(_frames(5)), [100, 200, 300, 400, 500])
    assert record == {"path": str(path), "frames": 5, "width": 40, "height": 24, "bytes": path.stat().st_size}
    assert _read(path) == ("WEBP", 5, (40, 24), [100, 200, 300, 400, 500])
    write_preview(path, _frames(1), 40)                   # one frame: a still
    assert _read(path)[1:3] == (1, (40, 24))


def test_write_preview_replaces_the_file_atomically(tmp_path, monkeypatch):
    """While a preview is written the path shows the previous whole file; a failed write leaves it in place."""
    path = tmp_path / "out.mp4.preview.webp"
    write_preview(path, _frames(3, seed=1), 100)
    previous = path.read_bytes()
    seen = []
    real_save = Image.Image.save

    def watching_save(self, fp, *args, **kwargs):
        seen.append(path.read_bytes() == previous)         # mid-write: the old file, whole
        real_save(self, fp, *args, **kwargs)
        seen.append(path.read_bytes() == previous)         # written but not yet renamed
        if len(seen) == 4:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", watching_save)
    write_preview(path, _frames(4, seed=2), 100)
    assert seen == [True, True] and path.read_bytes() != previous and _read(path)[1] == 4
    replaced = path.read_bytes()
    with pytest.raises(PreviewFileError, match="No space left"):
        write_preview(path, _frames(6, seed=3), 100)
    assert path.read_bytes() == replaced and sorted(os.listdir(tmp_path)) == [path.name]   # no temp file left


def test_write_preview_without_webp_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(preview_file, "Image", None)
    with pytest.raises(PreviewFileError, match="Pillow is not installed"):
        write_preview(tmp_path / "p.webp", _frames(1), 40)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("frames, ms", [(np.zeros((2, 4, 4, 3), np.float32), 40), (np.zeros((2, 4, 4), np.uint8), 40),
                                        (np.zeros((2, 4, 4, 3), np.uint8), [40])])
def test_write_preview_refuses_bad_frames(tmp_path, frames, ms):
    with pytest.raises(ValueError):
        write_preview(tmp_path / "p.webp", frames, ms)


# ------------------------------------------------------------------ every N steps, and the video unchanged

def test_previewer_writes_every_n_steps_and_after_the_last(tmp_path):
    shape = (1, 6, 4, 4, 6)                               # 34 frames of 64 x 96
    path = tmp_path / "out.mp4.preview.webp"
    previewer = Previewer(path, random_map(), every=3, steps=7, log=lambda s: None)
    g = torch.Generator().manual_seed(0)
    written = []
    for i in range(7):
        record = previewer.step(i, torch.randn(shape, generator=g), torch.randn(shape, generator=g), i / 7)
        if record:
            written.append(record["step"])
            assert _read(path)[1:3] == (6, (96, 64))
    assert written == [3, 6, 7]
    assert [r["frames"] for r in previewer.records] == [6, 6, 6]
    assert sum(_read(path)[3]) == 34 * 40


def test_previewer_stops_after_a_failed_write(tmp_path):
    said = []
    previewer = Previewer(tmp_path / "missing" / "out.mp4.preview.webp", random_map(), every=1, log=said.append)
    x = torch.randn(1, 3, 4, 2, 2)
    assert previewer.step(0, x, x, 0.5) is None and previewer.step(1, x, x, 0.5) is None
    assert len(said) == 1 and "preview" in said[0] and "\n" not in said[0]
    assert not previewer.due(2)


def test_denoise_is_bit_identical_with_and_without_previews(tmp_path):
    """The tiny pipeline, run twice from the same noise; the second writes a preview after every step from the
    loop's own tensors (the latents before the step and the velocity the step used). The final latents are
    compared bit for bit: they are all the decode reads, and the decode is deterministic (test_pipeline.py)."""
    io, meta = read_io(FIXTURES / "tiny-public" / "pipeline_io.safetensors")
    call = json.loads(meta["call"])
    pipe = PhasePipeline.open(complete_model_dir(FIXTURES / "tiny-public", tmp_path), profile="cpu", progress=False)
    sigmas = flow_sigmas(call["steps"], call["time_shift"])
    kwargs = dict(prompt_embeds=(io["caption.y"], io["caption.y_mask"], io["caption.clip_embedding"]),
                  num_frames=call["num_frames"], height=call["height"], width=call["width"],
                  num_inference_steps=call["steps"], guidance_scale=call["guidance"], time_shift=call["time_shift"],
                  output_type="latent")
    plain = pipe(latents=io["step0.latents_in"].clone(), **kwargs)

    previewer = Previewer(tmp_path / "out.mp4.preview.webp", random_map(), every=1, steps=call["steps"])
    before = [io["step0.latents_in"].float()]

    def preview(done, latents):
        i = done - 1
        velocity = (latents - before[-1]) / (sigmas[i + 1] - sigmas[i])
        previewer.step(i, before[-1], velocity, sigmas[i])
        before.append(latents.clone())

    with_previews = pipe(latents=io["step0.latents_in"].clone(), step_callback=preview, **kwargs)
    assert [r["step"] for r in previewer.records] == list(range(1, call["steps"] + 1))
    assert torch.equal(plain, with_previews)


def test_a_run_says_so_before_it_fits_the_map_once(tmp_path, monkeypatch):
    """The first preview of a VAE folder without a stored map fits one (a minute or two for the release's VAE on
    two cores): the run says so first; the next run reads the cache and says nothing."""
    from lowvram_stepvideo.run import live_preview
    monkeypatch.setattr(pm, "ENCODER_RECIPE", (4, 4, 64))
    monkeypatch.setenv("LOWVRAM_STEPVIDEO_CACHE", str(tmp_path / "cache"))
    said = []
    for _ in range(2):
        hook = live_preview.preview_hook(1, tmp_path / "a.mp4.preview.webp", ENCODER_VAE, 4, lambda record: None,
                                         said.append)
        assert hook is not None
    assert said == [live_preview.FITTING]
