"""Step-Video-TI2V against its reference fixtures (ti2v-public, float32): the DiT forward, the first image's
preprocessing, the VAE posterior, the condition latents, the latents after every step and the frames."""
import json

import pytest
import torch
from conftest import RELEASE, complete_model_dir, manifest_shapes, read_io, ti2v_fixture

from lowvram_stepvideo.files.configs import DiTConfig
from lowvram_stepvideo.loading.assign import build_on_meta
from lowvram_stepvideo.loading.loaders import load_dit, open_vae
from lowvram_stepvideo.models.dit import StepVideoModel
from lowvram_stepvideo.pipeline.conditioning import condition_latents, prepare_first_image
from lowvram_stepvideo.pipeline.phases import PhasePipeline

FIXTURE = ti2v_fixture()
INPUTS = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_2", "encoder_attention_mask")


def _max_err(got, ref):
    return (got.reshape(ref.shape).float() - ref.float()).abs().max().item()


@pytest.fixture(scope="module")
def dit_io():
    return read_io(FIXTURE / "dit_io.safetensors")


@pytest.fixture(scope="module")
def pipeline_io():
    tensors, meta = read_io(FIXTURE / "pipeline_io.safetensors")
    return tensors, json.loads(meta["call"])


def test_dit_forward_and_intermediates_match_reference(dit_io, one_torch_thread):
    io, meta = dit_io
    model = load_dit(FIXTURE / "model_dir" / "transformer", dtype=torch.float32)
    assert model.config.kind == "ti2v" and model.pos_embed.proj.weight.shape[1] == 8
    captured = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda m, a, out, name=name: captured.__setitem__(name, out))
        for name in ("pos_embed", "adaln_single", "transformer_blocks.0", "transformer_blocks.1")]
    motion = torch.full((2,), float(meta["motion_score"]))
    with torch.inference_mode():
        out = model(*(io[f"in.{k}"] for k in INPUTS), condition_hidden_states=io["in.condition_hidden_states"],
                    motion_score=motion)
    for h in hooks:
        h.remove()
    assert _max_err(out, io["out.x"]) <= 1e-4
    assert _max_err(captured["pos_embed"], io["inter.pos_embed"]) <= 1e-4
    assert _max_err(captured["adaln_single"][0], io["inter.adaln_single.0"]) <= 1e-4
    assert _max_err(captured["adaln_single"][1], io["inter.adaln_single.1"]) <= 1e-4
    for i in range(2):
        assert _max_err(captured[f"transformer_blocks.{i}"], io[f"inter.block{i}"]) <= 1e-4


def test_motion_score_changes_the_output_and_is_required(dit_io):
    io, _ = dit_io
    model = load_dit(FIXTURE / "model_dir" / "transformer", dtype=torch.float32)
    args = [io[f"in.{k}"] for k in INPUTS]
    cond = io["in.condition_hidden_states"]
    with torch.inference_mode():
        five = model(*args, condition_hidden_states=cond, motion_score=torch.full((2,), 5.0))
        ten = model(*args, condition_hidden_states=cond, motion_score=torch.full((2,), 10.0))
        assert _max_err(five, ten) > 1e-3
        with pytest.raises(ValueError, match="motion score"):
            model(*args, condition_hidden_states=cond)
        with pytest.raises(ValueError, match="condition latents"):
            model(*args, motion_score=torch.full((2,), 5.0))


def test_t2v_dit_refuses_ti2v_inputs():
    model = build_on_meta(lambda: StepVideoModel(DiTConfig(num_layers=1, num_heads=1, in_channels=4,
                                                             out_channels=4, caption_channels=(16, 8))))
    x = torch.zeros(1, 1, 4, 2, 2, device="meta")
    with pytest.raises(ValueError, match="T2V"):
        model.conditioned(x, x)
    with pytest.raises(ValueError, match="T2V"):
        model.adaln_single.emb(torch.zeros(1, device="meta"), torch.float32, torch.zeros(1, device="meta"))


def test_full_size_ti2v_state_dict_is_t2v_plus_the_release_delta():
    delta = json.loads((RELEASE / "stepvideo-ti2v" / "transformer_delta.json").read_text())
    config = DiTConfig.from_file(RELEASE / "stepvideo-ti2v" / "transformer" / "config.json")
    assert (config.kind, config.in_channels, config.patch_in_channels) == ("ti2v", 64, 128)
    model = build_on_meta(lambda: StepVideoModel(config))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = dict(manifest_shapes("transformer"))
    want.update({k: tuple(v) for k, v in delta["added"].items()})
    want.update({k: tuple(v["ti2v"]) for k, v in delta["changed_shape_from_t2v"].items()})
    assert got == want and len(got) == delta["num_keys"]


def test_first_image_preprocessing_matches_reference(pipeline_io):
    io, call = pipeline_io
    image = prepare_first_image(FIXTURE / call["first_image"], call["height"], call["width"])
    assert image.shape == io["vae_enc.in.image"].shape and image.dtype == torch.float32
    assert _max_err(image, io["vae_enc.in.image"]) <= 1e-5


def test_vae_posterior_and_sample_match_reference(pipeline_io):
    io, _ = pipeline_io
    vae = open_vae(FIXTURE / "model_dir" / "vae", with_decoder=False).load(torch.float32)
    assert vae.decoder is None
    with torch.inference_mode():
        mean, std = vae.posterior(io["vae_enc.in.image"])
    assert _max_err(mean, io["vae_enc.mean"]) <= 1e-5
    assert _max_err(std, io["vae_enc.std"]) <= 1e-5
    assert _max_err(mean + std * io["vae_enc.noise"], io["vae_enc.out.latent"]) <= 1e-5


def test_condition_latents_match_reference(pipeline_io):
    io, _ = pipeline_io
    cond = condition_latents(io["vae_enc.out.latent"], io["condition_hidden_states"].shape[1])
    assert torch.equal(cond, io["condition_hidden_states"])   # bf16-rounded frame 0, zeros after


@pytest.fixture(scope="module")
def ti2v_pipe(tmp_path_factory):
    model_dir = complete_model_dir(FIXTURE, tmp_path_factory.mktemp("ti2v"))
    return PhasePipeline.open(model_dir, profile="cpu", progress=False)


def _run(pipe, io, call, **kwargs):
    return pipe(prompt_embeds=(io["caption.y"], io["caption.y_mask"], io["caption.clip_embedding"]),
                latents=io["step0.noise"], num_frames=call["num_frames"], height=call["height"],
                width=call["width"], num_inference_steps=call["steps"], guidance_scale=call["guidance"],
                time_shift=call["time_shift"], motion_score=call["motion_score"], **kwargs)


def test_latents_after_every_step_match_reference(ti2v_pipe, pipeline_io):
    io, call = pipeline_io
    assert ti2v_pipe.kind == "ti2v"
    seen = {}
    _run(ti2v_pipe, io, call, image_latents=io["vae_enc.out.latent"], output_type="latent",
         step_callback=lambda done, latents: seen.__setitem__(done, latents.clone()))
    assert sorted(seen) == list(range(1, call["steps"] + 1))
    for i in range(call["steps"]):
        assert _max_err(seen[i + 1], io[f"step{i}.latents_out"]) <= 1e-4


def test_frames_match_reference(ti2v_pipe, pipeline_io):
    io, call = pipeline_io
    frames = torch.as_tensor(_run(ti2v_pipe, io, call, image_latents=io["vae_enc.out.latent"]))
    expected = io["out.frames_uint8"]
    assert frames.shape == expected.shape and frames.dtype == torch.uint8
    assert (frames.int() - expected.int()).abs().max() <= 1


def test_image_phase_encodes_the_first_image_as_the_reference(ti2v_pipe, pipeline_io, monkeypatch):
    """With the image itself, the pipeline's encode phase gives the reference's posterior; only the sample's
    noise is the pipeline's own (drawn for the seed), so the fixture's noise is put in its place here."""
    from lowvram_stepvideo.pipeline import phases
    io, call = pipeline_io
    monkeypatch.setattr(phases, "sample_image_latent", lambda mean, std, seed: mean + std * io["vae_enc.noise"])
    image = prepare_first_image(FIXTURE / call["first_image"], call["height"], call["width"])
    latent = ti2v_pipe.encode_image(image, seed=0)
    assert _max_err(latent, io["vae_enc.out.latent"]) <= 1e-5
    assert "image" in ti2v_pipe.timings


def test_the_pipeline_refuses_what_its_kind_does_not_take(ti2v_pipe, pipeline_io):
    io, call = pipeline_io
    with pytest.raises(ValueError, match="first image"):
        _run(ti2v_pipe, io, call, output_type="latent")
    with pytest.raises(ValueError, match="do not fit"):
        _run(ti2v_pipe, io, call, output_type="latent", image_latents=torch.zeros(1, 1, 4, 3, 3))
