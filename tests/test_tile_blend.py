"""VAE tiles blended on the device (issue 17, point 6): the same video as the host blend it replaces, each chunk's
frames leaving the device once, asynchronously into page-locked memory on CUDA (exercised here with fake CUDA
streams and events), and the plan's choice of a host blend when the device cannot hold a chunk's output."""
from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
import torch

from lowvram_stepvideo.engines import frame_copies, host_store, tiling
from lowvram_stepvideo.engines.tiling import (
    DecodeState, axis_weights, chunk_frames, decode_tiled, mix_boundary, tile_spans)
from lowvram_stepvideo.planning import decode_blend
from lowvram_stepvideo.planning.budgets import Budget
from lowvram_stepvideo.planning.plan import PhasePlan, Plan
from lowvram_stepvideo.profiles import Preset, load_profile, with_overrides
from test_tiling import (
    SCALE, TO_RGB, _FlakyDecoder, _latents, _spatial_upsample, _time_upsample, blur_decoder, pointwise_decoder)

GiB = 2**30


def previous_decode(decode_chunk, z, tile, overlap, per_chunk: int = 3) -> torch.Tensor:
    """The tiled decode as it was before this change, written out: each tile copied to the host in float32 and
    blended there, each chunk cast into the host video, then its boundary with the chunk before mixed in place."""
    _, t, _, h, w = z.shape
    tile, overlap = tiling.check_tiling(tile, overlap, (h, w))
    spans = [tile_spans(n, s, o) for n, s, o in zip((h, w), tile, overlap)]
    weights = [axis_weights(s, SCALE) for s in spans]
    out, start = None, 0
    for k, chunk in enumerate(z.split(per_chunk, dim=1)):
        acc = None
        for (y0, y1), wy in zip(spans[0], weights[0]):
            for (x0, x1), wx in zip(spans[1], weights[1]):
                frames = decode_chunk(chunk[..., y0:y1, x0:x1])
                if acc is None:
                    acc = torch.zeros(frames.shape[:3] + (h * SCALE, w * SCALE))
                    dtype = frames.dtype
                acc[..., y0 * SCALE:y1 * SCALE, x0 * SCALE:x1 * SCALE].addcmul_(frames.float(),
                                                                                 wy[:, None] * wx[None, :])
        n = acc.shape[1]
        if out is None:
            total = sum(chunk_frames(c.shape[1]) for c in z.split(per_chunk, dim=1))
            out = torch.empty((acc.shape[0], total) + acc.shape[2:], dtype=dtype)
        out[:, start:start + n].copy_(acc)
        if k:
            mix_boundary(out, start, frame_len=chunk_frames(per_chunk))
        start += n
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("t, size, tile, overlap", [
    (7, (5, 6), (2, 3), 1),     # three chunks, the last of one latent (one frame)
    (4, (7, 9), (3, 4), (1, 2)),
    (5, (6, 11), (6, 5), 3),
    (3, (5, 6), (5, 6), 0),     # one tile: nothing blended
])
def test_the_device_blend_gives_the_previous_host_blend_exactly(dtype, t, size, tile, overlap):
    """Float32 blend arithmetic on the device, the cast and the boundary mix in the decoder's dtype: the video is
    bit for bit the one the host blend made (here the device is the CPU; the arithmetic is the same IEEE
    float32/bfloat16 on a GPU, whose fused or vectorised kernels are not checked here)."""
    z = _latents(t=t, h=size[0], w=size[1], b=2, dtype=dtype)
    expected = previous_decode(blur_decoder, z, tile, overlap)
    for blend in (None, "cpu"):
        video = decode_tiled(blur_decoder, z, tile, overlap, scale=SCALE, out_device="cpu", blend_device=blend)
        assert video.dtype == dtype and torch.equal(video, expected)


def test_one_frame_chunks_carry_the_held_frame_through_every_boundary():
    """latents_per_chunk=1: every chunk is one frame, so each held frame was itself the back of the boundary
    before."""
    z = _latents(t=5, h=4, w=5)
    expected = previous_decode(pointwise_decoder, z, (2, 3), 1, per_chunk=1)
    video = decode_tiled(pointwise_decoder, z, (2, 3), 1, scale=SCALE, latents_per_chunk=1)
    assert video.shape[1] == 5 and torch.equal(video, expected)


def test_a_retry_after_out_of_memory_keeps_the_held_frame():
    z = _latents(t=8, h=5, w=6)                 # chunks of 3, 3 and 2 latents; 2 x 2 tiles of (3, 4)
    flaky, state = _FlakyDecoder(fail_call=4), DecodeState()
    with pytest.raises(torch.OutOfMemoryError):
        decode_tiled(flaky, z, (3, 4), 1, scale=SCALE, state=state)
    assert state.next_chunk == 0 and state.held is None
    flaky, state = _FlakyDecoder(fail_call=6), DecodeState()
    with pytest.raises(torch.OutOfMemoryError):
        decode_tiled(flaky, z, (3, 4), 1, scale=SCALE, state=state)
    assert state.next_chunk == 1 and state.held is not None and state.held.shape[1] == 1
    video = decode_tiled(flaky, z, (5, 6), 0, scale=SCALE, state=state)      # the rest with one tile per frame
    chunks = [previous_decode(pointwise_decoder, z[:, :3], (3, 4), 1),
              previous_decode(pointwise_decoder, z[:, 3:6], (5, 6), 0),
              previous_decode(pointwise_decoder, z[:, 6:], (5, 6), 0)]
    expected = torch.cat(chunks, dim=1)
    mix_boundary(expected, 17)
    mix_boundary(expected, 34)
    assert torch.equal(video, expected)


# ---- fake CUDA: the asynchronous copies into page-locked memory ----------------------------------------------

class _Event:
    log: list

    def __init__(self):
        self.where, self.landed = None, False

    def record(self, stream=None):
        self.where = stream.name
        self.log.append(("record", stream.name))

    def query(self):
        return self.landed

    def synchronize(self):
        self.landed = True
        self.log.append(("synchronize", self.where))


class _Stream:
    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def wait_event(self, event):
        self.log.append(("wait", self.name, event.where))


@pytest.fixture
def fake_cuda(monkeypatch):
    """Streams and events that record what is asked of them; "page-locked" buffers are plain RAM that say they
    were asked for. Copies on the CPU are synchronous, so the video stays exact."""
    log, pinned = [], []
    _Event.log = log
    compute = _Stream("compute", log)
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _Stream("copy", log))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)

    def buffer(nbytes, pin):
        pinned.append(pin)
        return torch.empty(nbytes, dtype=torch.uint8)
    monkeypatch.setattr(host_store, "host_buffer", buffer)
    made = []

    def copies(device):
        made.append(frame_copies.FrameCopies(device, cuda=True))    # take the CUDA path with the fakes above
        return made[-1]
    monkeypatch.setattr(tiling, "frame_copies", copies)
    return log, pinned, made


def test_each_frame_leaves_the_device_once_asynchronously_into_page_locked_memory(fake_cuda, monkeypatch):
    log, _, made = fake_cuda
    z = _latents(t=7, h=5, w=6, dtype=torch.bfloat16)       # chunks of 17, 17 and 1 frames
    expected = previous_decode(blur_decoder, z, (2, 3), 1)
    state = DecodeState(out=torch.empty_like(expected))     # (so that the copies' frames can be told)
    frames, copy = [], frame_copies.FrameCopies.copy

    def recording(self, dst, src):
        first = (dst.storage_offset() - state.out.storage_offset()) // state.out.stride(1)
        frames.extend(range(first, first + dst.shape[1]))
        copy(self, dst, src)
    monkeypatch.setattr(frame_copies.FrameCopies, "copy", recording)
    video = decode_tiled(blur_decoder, z, (2, 3), 1, scale=SCALE, out_device="cpu", state=state)
    assert torch.equal(video, expected)
    assert sorted(frames) == list(range(expected.shape[1]))   # every frame once
    copies = made[-1]
    # chunk 0: all but its last frame; chunk 1: the boundary's front, then all but its last; chunk 2 (one
    # frame): the boundary's front, then itself
    assert copies.queued == 5 and not copies.pending
    waits = [entry for entry in log if entry[0] == "wait"]
    assert waits == [("wait", "copy", "compute")] * 5        # each after the work that made its frames
    synced = [i for i, entry in enumerate(log) if entry[0] == "synchronize"]
    assert synced == list(range(len(log) - 5, len(log)))     # the host waited only at the end of the decode


def test_the_output_video_is_page_locked_on_cuda(fake_cuda):
    _, pinned, _ = fake_cuda
    z = _latents(t=4, h=5, w=6)
    video = decode_tiled(pointwise_decoder, z, (2, 3), 1, scale=SCALE, out_device="cpu")
    assert pinned == [True]
    assert torch.equal(video, previous_decode(pointwise_decoder, z, (2, 3), 1))


def test_sources_are_kept_until_their_copy_has_landed(fake_cuda):
    _, _, _ = fake_cuda
    copies = frame_copies.FrameCopies("cpu", cuda=True)
    src = [torch.full((1, 2, 3, 4, 4), float(i)) for i in range(3)]
    dst = torch.zeros(1, 6, 3, 4, 4)
    for i, s in enumerate(src):
        copies.copy(dst[:, 2 * i:2 * i + 2], s)
    assert all(kept is s for (_, kept), s in zip(copies.pending, src))   # none has landed: all kept alive
    copies.pending[0][0].synchronize()
    copies.copy(dst[:, :0], src[0][:, :0])
    assert len(copies.pending) == 3 and copies.pending[0][1] is src[1]   # the landed one was let go
    copies.finish()
    assert not copies.pending and torch.equal(dst[:, 4:], src[2])


def test_a_video_that_cannot_be_page_locked_is_pageable_with_a_warning(monkeypatch, caplog):
    def refuse(nbytes, pin):
        if pin:
            raise RuntimeError("cannot pin\nmore")
        return torch.empty(nbytes, dtype=torch.uint8)
    monkeypatch.setattr(host_store, "host_buffer", refuse)
    video = frame_copies.output_video((1, 2, 3, 4, 4), torch.bfloat16, torch.device("cpu"), pinned=True)
    assert video.shape == (1, 2, 3, 4, 4) and video.dtype == torch.bfloat16
    assert "could not page-lock" in caplog.text and "pageable" in caplog.text


# ---- the plan: a host blend only when the device cannot hold a chunk's output ---------------------------------

def test_the_plan_blends_on_the_host_only_when_the_device_cannot_hold_a_chunk():
    profile = with_overrides(load_profile("8gb"), vae_tile=16, vae_overlap=2)
    preset = Preset(17, 544, 992, 30)
    freed, taken = decode_blend.blend_bytes(profile, preset)
    whole = frame_copies.chunk_output_bytes(1, 17, 544, 992, profile.torch_dtype)
    assert freed == 4 * 17 * 3 * 544 * 992 and taken == freed + whole
    decode = PhasePlan(6 * GiB, 2 * GiB)
    plan = Plan("8gb", str(preset), {"denoise": PhasePlan(5 * GiB, GiB), "decode": decode})

    def budget(vram):
        return Budget("cuda", vram, 16 * GiB, "", "")
    assert decode_blend.blends_on_device(plan, budget(6 * GiB), profile, preset)            # it fits: device
    tight = budget(6 * GiB - freed // 2)
    assert not decode_blend.blends_on_device(plan, tight, profile, preset)                  # only a host blend fits
    assert decode_blend.fits_some_way(plan, tight, profile, preset)
    hopeless = budget(6 * GiB - 2 * freed)
    assert decode_blend.blends_on_device(plan, hopeless, profile, preset)                   # neither fits
    assert not decode_blend.fits_some_way(plan, hopeless, profile, preset)
    untiled = replace(profile, vae=replace(profile.vae, tile=0, overlap=0))
    assert decode_blend.blend_bytes(untiled, preset) == (0, 0)                              # one tile: no blend


def test_a_run_blends_on_the_host_when_the_plan_says(monkeypatch):
    """fit_to_card decides from the fitted plan and says so; the runtime then passes the host to the decode."""
    from types import SimpleNamespace
    from lowvram_stepvideo.run import ladder
    profile, preset = with_overrides(load_profile("8gb"), vae_tile=16, vae_overlap=2), Preset(17, 544, 992, 30)
    freed, _ = decode_blend.blend_bytes(profile, preset)
    plan = Plan("8gb", str(preset), {"denoise": PhasePlan(5 * GiB, GiB), "decode": PhasePlan(6 * GiB, 2 * GiB)})

    def first_fit(folder, asked, presets, budget, tried, options, layout):
        tried[0] = (asked, plan)
        return 0
    monkeypatch.setattr(ladder, "first_fit", first_fit)
    monkeypatch.setattr(ladder, "clamped", lambda folder, p: p)
    pipe = SimpleNamespace(folder=None, profile=profile, options=None)
    for vram, on_device in ((6 * GiB, True), (6 * GiB - freed // 2, False)):
        monkeypatch.setattr(ladder, "profile_budget", lambda p, v, r: Budget("cuda", vram, 16 * GiB, "", ""))
        decided, said = {}, []
        ladder.fit_to_card(pipe, [preset], None, said.append, decided=decided)
        assert decided == {"blend_on_device": on_device}
        assert any("blended in host RAM" in line for line in said) != on_device


def test_the_runtime_passes_where_to_blend(demo_dir, monkeypatch):
    from lowvram_stepvideo.pipeline.phases import PhasePipeline
    seen, real = [], tiling.decode_tiled

    def spy(*args, **kwargs):
        seen.append(kwargs["blend_device"])
        return real(*args, **kwargs)
    monkeypatch.setattr(tiling, "decode_tiled", spy)
    pipe = PhasePipeline.open(demo_dir, "cpu", progress=False, log=lambda msg: None)
    latents = torch.randn(1, 1, 4, 2, 4)          # one latent frame, two tiles: the smallest tiled decode
    pipe.decode(latents, tile=2)
    pipe.runtime.blend_on_device = False
    pipe.decode(latents, tile=2)
    assert seen == [pipe.runtime.device, torch.device("cpu")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_device_blend_matches_the_host_blend_and_lands_in_page_locked_memory():
    """On a real card: the blend on the GPU against the host blend of the same tiles. The float32 arithmetic is the
    same, but a GPU may fuse the multiply-add of addcmul_ (one rounding instead of two), so the bf16 videos may
    differ by one bf16 step (2**-7 near 1) where a sum lands on a rounding boundary."""
    z = _latents(t=7, h=5, w=6, b=2).cuda()

    def decoder(chunk):          # pointwise_decoder on the chunk's device, in bf16
        x = torch.einsum("btchw,oc->btohw", _time_upsample(chunk.float()), TO_RGB.to(chunk.device))
        return torch.tanh(_spatial_upsample(x)).to(torch.bfloat16)
    on_gpu = decode_tiled(decoder, z, (2, 3), 1, scale=SCALE, out_device="cpu")
    on_host = decode_tiled(decoder, z, (2, 3), 1, scale=SCALE, out_device="cpu", blend_device="cpu")
    assert on_gpu.device.type == on_host.device.type == "cpu" and on_gpu.is_pinned()
    torch.testing.assert_close(on_gpu.float(), on_host.float(), rtol=0, atol=2**-7)
