"""Sampling functions against the reference scheduler values and the reference pipeline run."""
import json

import pytest
import torch

from conftest import FIXTURES, read_io
from lowvram_stepvideo.pipeline.sampling import (
    REFERENCE_NOISE_SEED,
    cfg_combine,
    dit_timestep,
    euler_step,
    flow_sigmas,
    flow_timesteps,
    initial_noise,
    latent_shape)

SCHEDULES = json.loads((FIXTURES / "scheduler_timesteps.json").read_text())["schedules"]


def _ids(s):
    return f"{s['num_inference_steps']}steps-shift{s['time_shift']}"


@pytest.mark.parametrize("ref", SCHEDULES, ids=_ids)
def test_schedule_matches_reference(ref):
    sigmas = flow_sigmas(ref["num_inference_steps"], ref["time_shift"])
    t = flow_timesteps(sigmas)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (ref["num_inference_steps"] + 1,)
    assert torch.equal(sigmas, torch.tensor(ref["sigmas_float32"], dtype=torch.float32))
    assert torch.equal(t, torch.tensor(ref["timesteps_float32"], dtype=torch.float32))
    assert torch.equal(sigmas[1:] - sigmas[:-1], torch.tensor(ref["dt_float32"], dtype=torch.float32))
    assert sigmas[0] == 0 and sigmas[-1] == 1


@pytest.mark.parametrize("ref", SCHEDULES, ids=_ids)
def test_dit_timestep_bf16_matches_reference(ref):
    t = flow_timesteps(flow_sigmas(ref["num_inference_steps"], ref["time_shift"]))
    fed = torch.stack([dit_timestep(ti, 2, torch.bfloat16) for ti in t])  # (N, 2)
    assert fed.dtype == torch.bfloat16 and fed.shape == (len(t), 2)
    assert torch.equal(fed[:, 0].float(), torch.tensor(ref["timesteps_bf16"]))
    assert torch.equal(fed[:, 0], fed[:, 1])
    # what the DiT's AdaLN sees: t*1000 computed in bf16 (quirk Q2)
    assert torch.equal((fed[:, 0] * 1000).float(), torch.tensor(ref["timestep_x1000_bf16"]))


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        flow_sigmas(0, 13.0)
    with pytest.raises(ValueError, match="shift"):
        flow_sigmas(10, 0.0)


def test_pipeline_steps_match_reference(fixture_dir):
    io, meta = read_io(fixture_dir / "pipeline_io.safetensors")
    call = json.loads(meta["call"])
    sigmas = flow_sigmas(call["steps"], call["time_shift"])
    assert torch.equal(sigmas, io["sigmas"])
    for i, t in enumerate(flow_timesteps(sigmas)):
        assert torch.equal(t.reshape(1), io[f"step{i}.t"])
        out = euler_step(io[f"step{i}.latents_in"], io[f"step{i}.noise_pred_cfg"], sigmas[i], sigmas[i + 1])
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, io[f"step{i}.latents_out"], rtol=0, atol=1e-6)
    last = euler_step(io["step0.latents_in"], io["step0.noise_pred_cfg"], sigmas[0].item(), sigmas[1].item())
    torch.testing.assert_close(last, io["step0.latents_out"], rtol=0, atol=1e-6)  # float sigmas work too
    assert torch.equal(io[f"step{len(sigmas) - 2}.latents_out"], io["vae.in.latents"])


def test_euler_step_upcasts_bf16_sample():
    sample = torch.randn(2, 3).to(torch.bfloat16)
    v = torch.randn(2, 3).to(torch.bfloat16)
    out = euler_step(sample, v, torch.tensor(0.25), torch.tensor(0.5))
    assert out.dtype == torch.float32
    assert torch.equal(out, sample.float() + v.float() * 0.25)


def test_initial_noise_is_reference_cpu_noise(fixture_dir):
    io, _ = read_io(fixture_dir / "pipeline_io.safetensors")
    ref = io["step0.latents_in"]  # the reference's default-generator bf16 noise, stored as float32
    noise = initial_noise(tuple(ref.shape), REFERENCE_NOISE_SEED)
    assert noise.dtype == torch.bfloat16 and noise.device.type == "cpu"
    assert torch.equal(noise.float(), ref)
    assert REFERENCE_NOISE_SEED == torch.Generator().initial_seed()


def test_initial_noise_depends_only_on_seed():
    torch.manual_seed(123)  # global RNG state must not matter
    a = initial_noise((1, 3, 4, 5, 6), 42, torch.float32)
    torch.rand(10)
    b = initial_noise((1, 3, 4, 5, 6), 42, torch.float32)
    c = initial_noise((1, 3, 4, 5, 6), 43, torch.float32)
    assert a.dtype == torch.float32 and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="seed"):
        initial_noise((2,), 2**64)
    with pytest.raises(ValueError, match="seed"):
        initial_noise((2,), 1.5)


def test_cfg_combine_stays_in_velocity_dtype():
    cond = torch.randn(1000).to(torch.bfloat16)
    uncond = torch.randn(1000).to(torch.bfloat16)
    out = cfg_combine(cond, uncond, 9.0)
    assert out.dtype == torch.bfloat16
    # reference order of operations, each op rounded to bf16
    diff = cond - uncond
    assert torch.equal(out, uncond + 9.0 * diff)
    # differs from a float32 combination rounded once at the end (so the dtype really matters)
    once = (uncond.float() + 9.0 * (cond.float() - uncond.float())).to(torch.bfloat16)
    assert not torch.equal(out, once)
    assert torch.equal(cfg_combine(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(cfg_combine(cond.float(), uncond.float(), 1.0), cond.float())


# (frames, height, width) -> latent (B, T, C, h, w), frames produced, rounded? (docs/STEPVIDEO.md §5.3)
SHAPES = [
    ((204, 544, 992), (1, 36, 64, 34, 62), 204, False),
    ((204, 768, 768), (1, 36, 64, 48, 48), 204, False),
    ((136, 544, 992), (1, 24, 64, 34, 62), 136, False),
    ((1, 544, 992), (1, 1, 64, 34, 62), 1, False),
    ((16, 544, 992), (1, 1, 64, 34, 62), 1, True),
    ((17, 544, 992), (1, 3, 64, 34, 62), 17, False),
    ((50, 540, 960), (1, 6, 64, 33, 60), 34, True),
    ((34, 8, 5), (1, 6, 64, 1, 1), 34, True),
]


@pytest.mark.parametrize("request_, shape, frames, rounded", SHAPES, ids=[str(s[0]) for s in SHAPES])
def test_latent_shape_table(request_, shape, frames, rounded):
    ls = latent_shape(*request_, batch=1)
    assert ls.shape == shape and ls.num_frames == frames and ls.rounded is rounded
    assert ls.height == shape[3] * 16 and ls.width == shape[4] * 16
    assert ls.tokens == shape[1] * shape[3] * shape[4]


def test_latent_shape_table_tokens_and_fixture(fixture_dir):
    assert latent_shape(204, 544, 992).tokens == 75_888
    assert latent_shape(204, 768, 768).tokens == 82_944
    assert latent_shape(136, 544, 992).tokens == 50_592
    io, meta = read_io(fixture_dir / "pipeline_io.safetensors")
    call = json.loads(meta["call"])
    channels = io["step0.latents_in"].shape[2]
    ls = latent_shape(call["num_frames"], call["height"], call["width"], batch=1, channels=channels)
    assert ls.shape == tuple(io["step0.latents_in"].shape)
    assert ls.num_frames == io["vae.out.video"].shape[1]


def test_latent_shape_rejects_nonpositive():
    with pytest.raises(ValueError, match="num_frames"):
        latent_shape(0, 544, 992)
    with pytest.raises(ValueError, match="batch"):
        latent_shape(17, 544, 992, batch=0)
