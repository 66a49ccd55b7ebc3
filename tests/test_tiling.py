"""Tiled VAE decode against the plain chunked decode, with small stand-in chunk decoders."""
import pytest
import torch
import torch.nn.functional as F

from lowvram_stepvideo.engines.tiling import (
    DecodeState,
    TileOOMError,
    axis_weights,
    check_tiling,
    chunk_frames,
    decode_tiled,
    decode_untiled,
    decode_with_fallback,
    halving_tiles,
    mix_boundary,
    tile_count,
    tile_overhead,
    tile_spans)

SCALE = 8  # stand-in upscale factor (the real VAE has 16; smaller keeps the tests fast)
TO_RGB = torch.tensor([[0.9, -0.4, 0.3, 0.2], [-0.2, 0.7, 0.5, -0.6], [0.4, 0.1, -0.8, 0.5]])  # (3, C=4)


def _time_upsample(z):
    """(B, t, C, h, w) -> (B, T, C, h, w), nearest in time, T = frames the real decoder makes from t latents."""
    t = z.shape[1]
    idx = torch.arange(chunk_frames(t)) * t // chunk_frames(t)
    return z[:, idx]


def _spatial_upsample(x):
    return x.repeat_interleave(SCALE, dim=-2).repeat_interleave(SCALE, dim=-1)


def pointwise_decoder(z):
    """Every output pixel depends only on its own latent pixel: tiling cannot change anything."""
    x = torch.einsum("btchw,oc->btohw", _time_upsample(z.float()), TO_RGB)  # (B, T, 3, h, w)
    return torch.tanh(_spatial_upsample(x)).to(z.dtype)


def blur_decoder(z):
    """Pointwise decoder followed by a 3x3 zero-padded blur per frame: a spatial receptive field."""
    x = pointwise_decoder(z.float())  # (B, T, 3, H, W)
    b, t, c, h, w = x.shape
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    y = F.conv2d(x.reshape(b * t * c, 1, h, w), kernel[None, None], padding=1)  # (B*T*3, 1, H, W)
    return (y.reshape(b, t, c, h, w) + 0.3 * x.roll(1, dims=2)).to(z.dtype)


def tiled_decode(*args, **kwargs):
    return decode_tiled(*args, scale=SCALE, **kwargs)


def _latents(t=7, h=5, w=6, b=1, dtype=torch.float32):
    return torch.randn(b, t, 4, h, w).to(dtype)


def _reference_mix(x, frame_len=17):
    """The reference's vectorised mix, written independently: every boundary at once via strided slices."""
    x = x.clone()
    front = slice(frame_len - 1, x.size(1) - 1, frame_len)
    back = slice(frame_len, x.size(1), frame_len)
    x[:, back] = x[:, back] * 0.6 + x[:, front] * (1.0 - 0.6)
    x[:, front] = x[:, front] * 0.6 + x[:, back] * (1.0 - 0.6)
    return x


@pytest.mark.parametrize("t", [1, 2, 3, 4, 5, 7, 9])
def test_untiled_decode_matches_reference_mix(t):
    z = _latents(t=t, b=2, dtype=torch.bfloat16)
    chunks = [blur_decoder(c) for c in z.split(3, dim=1)]
    video = decode_untiled(blur_decoder, z)
    assert video.dtype == torch.bfloat16
    assert video.shape[1] == sum(chunk_frames(c.shape[1]) for c in z.split(3, dim=1))
    assert torch.equal(video, _reference_mix(torch.cat(chunks, dim=1)))


def test_mix_boundary_is_sequential():
    video = torch.stack([torch.full((1, 1, 1), 10.0), torch.full((1, 1, 1), 20.0)])[None]  # (1, 2, 1, 1, 1)
    mix_boundary(video, 1, frame_len=1)
    b = 0.6 * 20 + 0.4 * 10
    assert video[0, 1].item() == pytest.approx(b)
    assert video[0, 0].item() == pytest.approx(0.6 * 10 + 0.4 * b)


def test_mix_boundary_touches_one_boundary_only():
    video = torch.randn(1, 17 * 3, 3, 2, 2)
    mixed = video.clone()
    mix_boundary(mixed, 17)
    mix_boundary(mixed, 34)
    assert torch.equal(mixed, _reference_mix(video))
    once = video.clone()
    mix_boundary(once, 34)
    assert torch.equal(once[:, :33], video[:, :33])


@pytest.mark.parametrize("tile", [(5, 6), (64, 64), 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_cover_tile_is_identical_to_untiled(tile, dtype):
    z = _latents(t=7, h=5, w=6, b=2, dtype=dtype)
    video = tiled_decode(blur_decoder, z, tile, overlap=2)
    assert video.dtype == dtype
    assert torch.equal(video, decode_untiled(blur_decoder, z))


@pytest.mark.parametrize("size, tile, overlap", [
    ((5, 6), (2, 3), 1),      # tiles divide unevenly, last tile flush with the end
    ((7, 9), (3, 4), (1, 2)),  # odd frame, per-axis overlap
    ((7, 9), (4, 2), 0),      # no overlap: hard seams
    ((6, 11), (6, 5), 3),     # tiling along width only
    ((9, 4), (3, 4), 2),      # triple overlaps (stride 1 then a flush last tile)
])
@pytest.mark.parametrize("t", [3, 4, 5])  # whole chunk, last chunk of 1 and of 2 latents
def test_pointwise_tiled_equals_untiled(size, tile, overlap, t):
    z = _latents(t=t, h=size[0], w=size[1])
    tiled = tiled_decode(pointwise_decoder, z, tile, overlap)
    plain = decode_untiled(pointwise_decoder, z)
    frames = 17 + (chunk_frames(t - 3) if t > 3 else 0)
    assert tiled.shape == plain.shape == (1, frames, 3, size[0] * SCALE, size[1] * SCALE)
    torch.testing.assert_close(tiled, plain, rtol=0, atol=1e-6)


def test_default_scale_is_16():
    def decoder16(z):
        return torch.tanh(_time_upsample(z)[:, :, :3]).repeat_interleave(16, -2).repeat_interleave(16, -1)
    z = _latents(t=3, h=3, w=2)
    video = decode_tiled(decoder16, z, (2, 1), (1, 0))
    assert video.shape == (1, 17, 3, 48, 32)
    torch.testing.assert_close(video, decode_untiled(decoder16, z), rtol=0, atol=1e-6)


def test_tiled_keeps_decoder_dtype_and_device():
    z = _latents(t=4, h=5, w=7, dtype=torch.bfloat16)
    video = tiled_decode(pointwise_decoder, z, (2, 3), 1, out_device="cpu")
    assert video.dtype == torch.bfloat16 and video.device.type == "cpu"
    torch.testing.assert_close(video, decode_untiled(pointwise_decoder, z), rtol=0, atol=0.01)


def test_receptive_field_tiled_is_close_and_overlap_helps():
    z = _latents(t=3, h=6, w=8)
    plain = decode_untiled(blur_decoder, z)
    err_hard = (tiled_decode(blur_decoder, z, (3, 4), 0) - plain).abs().max().item()
    err_soft = (tiled_decode(blur_decoder, z, (3, 4), 1) - plain).abs().max().item()
    assert 0.01 < err_hard  # the stand-in really has a receptive field: seams show without blending
    assert err_soft < 0.05 and err_soft < err_hard / 4


@pytest.mark.parametrize("length, tile, overlap", [(5, 2, 1), (9, 4, 1), (9, 3, 2), (34, 16, 4), (62, 20, 6),
                                                   (7, 7, 3), (7, 10, 3), (11, 4, 0)])
def test_tile_spans_cover_and_overlap(length, tile, overlap):
    spans = tile_spans(length, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    sizes = {e - s for s, e in spans}
    assert len(sizes) == 1 and sizes.pop() <= min(tile, length)        # one tile shape, never above `tile`
    fewest = 1 if tile >= length else -(-(length - overlap) // (tile - overlap))
    assert len(spans) == fewest
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert s0 < s1 and e0 - s1 >= overlap  # consecutive tiles overlap by at least `overlap`
    if len(spans) > 1:   # the least coverage: one pixel smaller and the tiles no longer cover with that overlap
        size = spans[0][1] - spans[0][0]
        assert (size - 1) * len(spans) - (len(spans) - 1) * overlap < length


def test_tile_overhead_counts_the_decoded_area():
    assert tile_overhead((34, 62), 64, 8) == 1.0                          # untiled
    assert tile_overhead((34, 62), (34, 32), (0, 2)) == pytest.approx(64 / 62)   # two 32-wide tiles, 2 shared


@pytest.mark.parametrize("length, tile, overlap", [(5, 2, 1), (9, 3, 2), (9, 4, 1), (34, 16, 4), (7, 7, 3),
                                                   (11, 4, 0), (62, 20, 6)])
@pytest.mark.parametrize("scale", [1, 16])
def test_blend_weights_sum_to_one(length, tile, overlap, scale):
    spans = tile_spans(length, tile, overlap)
    weights = axis_weights(spans, scale)
    total = torch.zeros(length * scale)
    for (s, e), w in zip(spans, weights):
        assert w.shape == ((e - s) * scale,) and (w > 0).all() and (w <= 1 + 1e-6).all()
        total[s * scale:e * scale] += w
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-6)
    # 2-D weights are products of the axis weights: they sum to 1 too
    wy = axis_weights(tile_spans(length, tile, overlap), scale)
    grid = torch.zeros(length * scale, length * scale)
    for (ys, ye), a in zip(spans, wy):
        for (xs, xe), b in zip(spans, weights):
            grid[ys * scale:ye * scale, xs * scale:xe * scale] += a[:, None] * b[None, :]
    torch.testing.assert_close(grid, torch.ones_like(grid), rtol=0, atol=2e-6)


def test_blend_ramp_is_linear_across_a_plain_overlap():
    a, b = axis_weights([(0, 3), (2, 5)], scale=4)  # overlap = latent pixel 2 = output pixels 8..11
    assert torch.equal(a[:8], torch.ones(8)) and torch.equal(b[4:], torch.ones(8))
    torch.testing.assert_close(b[:4], torch.tensor([0.125, 0.375, 0.625, 0.875]))
    torch.testing.assert_close(a[8:], torch.tensor([0.875, 0.625, 0.375, 0.125]))


@pytest.mark.parametrize("tile, overlap, match", [
    ((2, 3), 2, "smaller than the tile height"),
    ((4, 3), (1, 3), "smaller than the tile width"),
    (0, 0, "at least 1"),
    ((2, 3), -1, "negative"),
    ((2, 3, 4), 0, "pair of ints"),
    (2.5, 0, "pair of ints"),
])
def test_tiling_validation_errors(tile, overlap, match):
    with pytest.raises(ValueError, match=match):
        check_tiling(tile, overlap, (6, 8))
    with pytest.raises(ValueError, match=match):
        tiled_decode(pointwise_decoder, _latents(t=3, h=6, w=8), tile, overlap)


def test_overlap_irrelevant_when_tile_covers_axis():
    assert check_tiling((6, 3), (7, 1), (6, 8)) == ((6, 3), (7, 1))


def test_wrong_decoder_output_shape_is_reported():
    with pytest.raises(ValueError, match="expected"):
        tiled_decode(lambda z: pointwise_decoder(z)[:, :-1], _latents(t=3, h=4, w=4), (2, 2), 1)


def test_progress_counts_tiles():
    calls = []
    tiled_decode(pointwise_decoder, _latents(t=5, h=5, w=6), (3, 4), 1, progress=lambda d, n: calls.append((d, n)))
    assert calls == [(i, 8) for i in range(0, 9)]  # 2 chunks x (2 x 2) tiles, the total known before the first
    assert tile_count(_latents(t=5, h=5, w=6).shape, (3, 4), 1) == 8


class _FlakyDecoder:
    """Pointwise decoder that runs out of memory on tiles larger than `limit` latent pixels, or on the given call."""

    def __init__(self, limit=None, fail_call=None):
        self.limit, self.fail_call, self.calls = limit, fail_call, []

    def __call__(self, z):
        self.calls.append(tuple(z.shape))
        if (self.limit and z.shape[-2] * z.shape[-1] > self.limit) or len(self.calls) == self.fail_call:
            raise torch.OutOfMemoryError("stand-in out of memory")
        return pointwise_decoder(z)


def test_state_resumes_after_out_of_memory():
    z = _latents(t=8, h=5, w=6)
    flaky, state = _FlakyDecoder(fail_call=2), DecodeState()
    with pytest.raises(torch.OutOfMemoryError):
        tiled_decode(flaky, z, (5, 6), 0, state=state)
    assert state.next_chunk == 1 and state.out is not None
    video = tiled_decode(flaky, z, (3, 4), 1, state=state)
    assert state.next_chunk == 3 and video is state.out
    assert len(flaky.calls) == 2 + 2 * 4  # chunk 0 kept, chunks 1 and 2 decoded with 2 x 2 tiles
    torch.testing.assert_close(video, decode_untiled(pointwise_decoder, z), rtol=0, atol=1e-6)


def test_state_of_other_latents_is_refused():
    state = DecodeState()
    tiled_decode(pointwise_decoder, _latents(t=3, h=4, w=4), 4, 0, state=state)
    with pytest.raises(ValueError, match="does not belong"):
        tiled_decode(pointwise_decoder, _latents(t=6, h=4, w=4), 4, 0, state=state)


def test_fallback_shrinks_tiles_and_keeps_finished_chunks():
    z = _latents(t=7, h=6, w=8)
    flaky, seen = _FlakyDecoder(limit=20), []
    tiles = halving_tiles((6, 8), 1, (6, 8), min_tile=3)
    video = decode_with_fallback(flaky, z, tiles, 1, on_oom=lambda a, b: seen.append((a, b)), scale=SCALE)
    assert tiles == [(6, 8), (3, 4), (3, 3)] and seen == [((6, 8), (3, 4))]
    torch.testing.assert_close(video, decode_untiled(pointwise_decoder, z), rtol=0, atol=1e-6)
    with pytest.raises(TileOOMError, match="out of memory even with 3x3"):
        decode_with_fallback(_FlakyDecoder(limit=1), z, tiles, 1, scale=SCALE)


def test_halving_tiles():
    assert halving_tiles((34, 62), 2, (34, 62)) == [(34, 62), (17, 31), (9, 16), (8, 8)]
    assert halving_tiles(64, 0, (20, 5), min_tile=4) == [(20, 5), (10, 4), (5, 4), (4, 4)]
    assert halving_tiles((34, 62), 6, (34, 62), min_tile=1) == [(34, 62), (17, 31), (13, 16), (13, 13)]


# ---------------------------------------------------------------------------------------------- the tiny real VAE

def _tiny_vae(fixture_dir):
    from lowvram_stepvideo.loading.loaders import load_vae
    return load_vae(fixture_dir / "model_dir" / "vae", dtype=torch.float32)


def test_full_cover_tiled_vae_decode_is_the_reference_decode(fixture_dir):
    """The real tiny VAE through decode_tiled with one tile: the reference video (one decode only: the expected
    value is the VAE's own concatenate-and-mix of the very chunk outputs decode_tiled received)."""
    from conftest import read_io
    from lowvram_stepvideo.models.vae import mix_chunks
    io, _ = read_io(fixture_dir / "pipeline_io.safetensors")
    vae, z, decoded = _tiny_vae(fixture_dir), io["vae.in.latents"], []

    def recording_decoder(chunk):
        decoded.append(vae.decode_chunk(chunk))
        return decoded[-1].clone()

    video = decode_tiled(recording_decoder, z, tile=max(z.shape[-2:]), overlap=0)
    assert [c.shape[1] for c in decoded] == [chunk_frames(c.shape[1]) for c in z.split(3, dim=1)]
    assert torch.equal(video, mix_chunks(torch.cat(decoded, dim=1), 17, inplace=True))  # = AutoencoderKL.decode
    assert (video - io["vae.out.video"]).abs().max().item() <= 1e-4


def test_decode_bar_knows_its_total_from_the_start_and_across_a_fallback(capsys):
    from lowvram_stepvideo.pipeline import progress
    from lowvram_stepvideo.pipeline.phases import _tile_progress
    z, seen = _latents(t=8, h=5, w=6), []
    flaky = _FlakyDecoder(fail_call=2)                  # chunk 0 decoded whole, then out of memory
    with progress.listen(lambda *a: seen.append(a[1:])):
        with progress.bar("decode", tile_count(z.shape, (5, 6), 0), unit="tile") as bar:
            decode_with_fallback(flaky, z, [(5, 6), (3, 4)], 1, progress=_tile_progress(bar), scale=SCALE)
    assert seen[0] == (0, 3)                            # 3 chunks x 1 tile, before any decoding
    assert seen[-1] == (1 + 2 * 4, 1 + 2 * 4)          # chunk 0 whole, chunks 1-2 in 2 x 2 tiles
    assert all(done <= total for done, total in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


@pytest.mark.parametrize("size", [(34, 62), (48, 48)], ids=["544x992", "768x768"])
def test_every_profile_tiles_within_1_4x_the_untiled_work(size):
    from lowvram_stepvideo.profiles import list_profiles, load_profile
    for name in list_profiles():
        vae = load_profile(name).vae
        assert tile_overhead(size, vae.tile or max(size), vae.overlap) <= 1.4, name
