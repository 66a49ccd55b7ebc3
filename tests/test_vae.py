"""Video VAE v2: reference fixtures (tiny), chunking/blending semantics, full-size structure on meta, loader cases."""
import json
import shutil

import pytest
import torch
from conftest import RELEASE_MODEL, manifest_shapes, read_io
from safetensors.torch import save_file

from lowvram_stepvideo.files.weights import CheckpointError
from lowvram_stepvideo.files.configs import ConfigError, VAEConfig, VAEDecoderConfig, VAEEncoderConfig
from lowvram_stepvideo.loading.loaders import load_vae
from lowvram_stepvideo.models import vae as vae_mod
from lowvram_stepvideo.models.vae import AutoencoderKL, mix_chunks, pixel_shuffle_3d, pixel_unshuffle_3d

ATOL = 1e-4


def tiny_vae(fixture_dir):
    return load_vae(fixture_dir / "model_dir" / "vae", dtype=torch.float32)


def latent_like(fixture_dir, frames, h=2, w=2):
    z = read_io(fixture_dir / "vae_io.safetensors")[0]["in.z"]
    return torch.randn(z.shape[0], frames, z.shape[2], h, w)


def assert_close(actual, expected, atol=ATOL, what=""):
    assert actual.shape == expected.shape, f"{what}: {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol}"


# ---------------------------------------------------------------------------------------------- reference fixtures

def test_decode_matches_reference(fixture_dir):
    tensors, _ = read_io(fixture_dir / "vae_io.safetensors")
    vae = tiny_vae(fixture_dir)
    captured = {}
    for name, module in {"conv_in": vae.decoder.conv_in, "attn_1": vae.decoder.mid.attn_1}.items():
        module.register_forward_hook(lambda m, args, out, name=name: captured.setdefault(name, out.clone()))
    video = vae.decode(tensors["in.z"])
    assert_close(captured["conv_in"], tensors["inter.dec.conv_in.chunk0"], what="decoder.conv_in")
    assert_close(captured["attn_1"], tensors["inter.dec.mid.attn_1.chunk0"], what="decoder.mid.attn_1")
    assert_close(video, tensors["out.video"], what="video")


def test_two_chunk_decode_matches_pipeline_reference(fixture_dir):
    tensors, _ = read_io(fixture_dir / "pipeline_io.safetensors")
    if "vae.in.latents" not in tensors:
        pytest.skip("this fixture set has no pipeline VAE tensors")
    assert tensors["vae.in.latents"].shape[1] > 3, "expected a multi-chunk decode"
    video = tiny_vae(fixture_dir).decode(tensors["vae.in.latents"])
    assert_close(video, tensors["vae.out.video"], what="pipeline video")


# ---------------------------------------------------------------------------------------------- chunking, blending

def test_decode_is_independent_chunks_then_sequential_mix(fixture_dir):
    vae = tiny_vae(fixture_dir)
    z = latent_like(fixture_dir, 7, h=1, w=1)                           # chunks of 3, 3, 1 latents
    video = vae.decode(z)
    parts = [vae.decode_chunk(z[:, :3]), vae.decode_chunk(z[:, 3:6]), vae.decode_chunk(z[:, 6:])]
    assert [p.shape[1] for p in parts] == [17, 17, 1]
    plain = torch.cat(parts, dim=1)
    expected = plain.clone()
    simultaneous = plain.clone()
    for f, b in ((16, 17), (33, 34)):                                   # last frame of chunk k, first of k+1
        expected[:, b] = 0.6 * plain[:, b] + 0.4 * plain[:, f]
        expected[:, f] = 0.6 * plain[:, f] + 0.4 * expected[:, b]
        simultaneous[:, f] = 0.6 * plain[:, f] + 0.4 * plain[:, b]
        simultaneous[:, b] = expected[:, b]
    assert_close(video, expected, atol=1e-6, what="decode vs explicit blend")
    assert (simultaneous - expected).abs().max() > 1e-3, "test input cannot tell sequential from simultaneous"
    assert (plain - expected).abs().max() > 1e-3, "blend changed nothing"


def test_mix_chunks_out_of_place_and_in_place():
    video = torch.randn(1, 34, 3, 4, 4)
    out = mix_chunks(video, 17)
    assert not torch.equal(out, video)
    assert torch.equal(out[:, :16], video[:, :16]) and torch.equal(out[:, 18:], video[:, 18:])
    same = mix_chunks(video, 17, inplace=True)
    assert same is video and torch.equal(same, out)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_chunk_frame_count(fixture_dir, k):
    vae = tiny_vae(fixture_dir)
    frames = vae.decode_chunk(latent_like(fixture_dir, k, h=1, w=1))
    assert frames.shape[1:] == ((2 * k - 1) * 4 - 3, 3, 16, 16)
    assert frames.shape[1] == vae.config.frames_for_latents(k)


def test_decode_chunk_rejects_long_or_malformed_latents(fixture_dir):
    vae = tiny_vae(fixture_dir)
    with pytest.raises(ValueError, match="at most 3"):
        vae.decode_chunk(latent_like(fixture_dir, 4, h=1, w=1))
    with pytest.raises(ValueError, match="latents must be"):
        vae.decode(torch.randn(1, 3, vae.config.z_channels + 1, 1, 1))


def test_time_sliced_convs_match_plain_path(fixture_dir, monkeypatch):
    vae = tiny_vae(fixture_dir)
    z = latent_like(fixture_dir, 2, h=1, w=2)                           # 2 latents -> 9 frames
    plain = vae.decode(z)
    monkeypatch.setattr(vae_mod, "SLICED_CONV_NUMEL", 1)               # every stride-1 conv goes sliced
    assert_close(vae.decode(z), plain, atol=1e-5, what="sliced vs plain decode")


@pytest.mark.parametrize("frames", [1, 2, 3, 7, 12])
def test_conv3d_time_sliced_matches_conv(frames, monkeypatch):
    conv = torch.nn.Conv3d(4, 6, 3, padding=(0, 1, 1))
    x = torch.randn(1, 4, frames + 2, 5, 3)
    residual = torch.randn(1, 6, frames, 5, 3)
    monkeypatch.setattr(vae_mod, "SLICED_CONV_NUMEL", 1)
    assert_close(vae_mod.conv3d_time_sliced(x, conv, residual), conv(x) + residual, atol=1e-6)


# ---------------------------------------------------------------------------------------------- pixel (un)shuffle

def test_pixel_shuffle_layout():
    """out[c, 2t+i-1, 2y+j, 2x+k] = in[8c + 4i + 2j + k, t, y, x] (spec: view (C,2,2,2,T,H,W), first frame dropped)."""
    x = torch.randn(1, 16, 3, 2, 4)
    out = pixel_shuffle_3d(x, 2)
    assert out.shape == (1, 2, 5, 4, 8)
    for c, i, j, k, t, y, xx in [(0, 1, 0, 0, 0, 0, 0), (1, 0, 1, 1, 2, 1, 3), (1, 1, 1, 0, 1, 0, 2)]:
        assert out[0, c, 2 * t + i - 1, 2 * y + j, 2 * xx + k] == x[0, 8 * c + 4 * i + 2 * j + k, t, y, xx]


def test_pixel_unshuffle_inverts_shuffle_and_pads_in_front():
    x = torch.randn(2, 3, 5, 4, 6)
    packed = pixel_unshuffle_3d(x, 2)
    assert packed.shape == (2, 24, 3, 2, 3)
    assert torch.equal(pixel_shuffle_3d(packed, 2), x)
    assert torch.all(packed[:, 0:4, 0] == 0)                            # (i=0) slots of the first frame: padding


def test_channel_shortcuts():
    x = torch.randn(1, 4, 3, 2, 2)
    dup = vae_mod.duplicate_channels_up(x, 2, 2)                        # 4 ch * 4 repeats = 2 ch * 8
    assert torch.equal(dup, pixel_shuffle_3d(x.repeat_interleave(4, dim=1), 2))
    avg = vae_mod.average_channels_down(x, 2, 1)
    assert torch.allclose(avg, torch.stack([x[:, 0:2].mean(1), x[:, 2:4].mean(1)], dim=1))


# ---------------------------------------------------------------------------------------------- full size, on meta

def release_vae():
    with torch.device("meta"):
        return AutoencoderKL(VAEConfig(), with_encoder=True)


def test_release_state_dict_matches_manifest():
    vae = release_vae()
    ours = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    stored = {k.replace("decoder.conv_out.", "decoder.conv_out.conv."): s for k, s in manifest_shapes("vae_v2").items()}
    assert ours == stored
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(vae), count(vae.encoder), count(vae.decoder)) == (498_818_819, 109_885_696, 388_933_123)


def test_release_shape_walk_on_meta():
    vae = release_vae()
    assert vae.decode_chunk(torch.empty(1, 3, 64, 34, 62, device="meta")).shape == (1, 17, 3, 544, 992)
    assert vae.decode(torch.empty(1, 4, 64, 34, 62, device="meta")).shape == (1, 18, 3, 544, 992)
    video = torch.empty(1, 17, 3, 544, 992, device="meta")
    assert vae.encode_moments(video).shape == (1, 3, 128, 34, 62)
    assert vae.encode(video).shape == (1, 3, 64, 34, 62)


# ---------------------------------------------------------------------------------------------- encoder API, loader

def tiny_encoder_config():
    return VAEConfig(z_channels=4, encoder=VAEEncoderConfig(ch=32, ch_mult=(1, 1, 1, 1)),
                     decoder=VAEDecoderConfig(ch=32, ch_mult=(2, 1, 1, 1)))


def write_vae_folder(folder, cfg_raw, tensors):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg_raw))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "vae_v2.safetensors"))
    return folder


def test_encode_sample_is_mean_plus_std_times_generator_noise(tmp_path):
    config = tiny_encoder_config()
    vae = AutoencoderKL(config, with_encoder=True).eval()
    video = torch.randn(1, 9, 3, 16, 16)                                # 8n+1 frames per chunk
    moments = vae.encode_moments(video)
    assert moments.shape == (1, 2, 8, 1, 1)
    mean, logvar = moments.chunk(2, dim=2)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    sample = vae.encode(video, generator=torch.Generator().manual_seed(7))
    assert_close(sample, mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * eps, atol=1e-6, what="sample")


def test_loader_builds_encoder_when_config_and_weights_have_it(tmp_path):
    config = tiny_encoder_config()
    state = AutoencoderKL(config, with_encoder=True).state_dict()
    stored = {k.replace("decoder.conv_out.conv.", "decoder.conv_out."): v for k, v in state.items()}
    raw = {"z_channels": 4, "encoder": {"ch": 32, "ch_mult": [1, 1, 1, 1], "present": True},
           "decoder": {"ch": 32, "ch_mult": [2, 1, 1, 1]}}
    vae = load_vae(write_vae_folder(tmp_path / "vae", raw, stored), dtype=torch.float32)
    assert vae.encoder is not None
    assert torch.equal(vae.encoder.conv_out.conv.weight, state["encoder.conv_out.conv.weight"])
    assert torch.equal(vae.decoder.conv_out.conv.weight, state["decoder.conv_out.conv.weight"])


def test_loader_falls_back_to_decoder_only(fixture_dir, tmp_path):
    src = fixture_dir / "model_dir" / "vae"
    raw = json.loads((src / "config.json").read_text())
    raw["encoder"]["present"] = True
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(raw))
    shutil.copy(src / "vae_v2.safetensors", folder / "vae_v2.safetensors")
    vae = load_vae(folder, dtype=torch.float32)
    assert vae.encoder is None
    with pytest.raises(ValueError, match="without encoder"):
        vae.encode(torch.zeros(1, 1, 3, 16, 16))


def test_encode_rejects_frame_counts_the_encoder_cannot_take():
    with torch.device("meta"):
        vae = AutoencoderKL(tiny_encoder_config(), with_encoder=True)
    assert vae.encode_moments(torch.empty(1, 17 + 9, 3, 16, 16, device="meta")).shape == (1, 5, 8, 1, 1)
    with pytest.raises(ValueError, match="8n\\+1"):
        vae.encode(torch.empty(1, 17 + 5, 3, 16, 16, device="meta"))


def test_missing_decoder_tensor_is_a_checkpoint_error(fixture_dir, tmp_path):
    src = fixture_dir / "model_dir" / "vae"
    tensors, _ = read_io(src / "vae_v2.safetensors")
    del tensors["decoder.mid.attn_1.q.conv.weight"]
    folder = write_vae_folder(tmp_path / "vae", json.loads((src / "config.json").read_text()), tensors)
    with pytest.raises(CheckpointError, match="decoder.mid.attn_1.q.conv.weight"):
        load_vae(folder, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- config

def test_release_defaults_without_config(tmp_path):
    assert VAEConfig.from_folder(tmp_path) == VAEConfig()
    assert VAEConfig().frames_for_latents(3) == 17


@pytest.mark.parametrize("raw, message", [
    ({"version": 1}, "version"),
    ({"decoder": {"ch": 40}}, "multiples of 32"),
    ({"latent_len": 4}, "frame_len"),
    ({"encoder": [1, 2]}, "not a VAE config"),
])
def test_bad_vae_config_is_one_line_error(tmp_path, raw, message):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=message):
        VAEConfig.from_folder(tmp_path)


def test_vae_folder_with_another_networks_config_is_refused(tmp_path):
    from lowvram_stepvideo.files.configs import ConfigError, VAEConfig
    (tmp_path / "config.json").write_text((RELEASE_MODEL / "transformer" / "config.json").read_text())
    with pytest.raises(ConfigError, match="another network's config"):
        VAEConfig.from_folder(tmp_path)


def test_attention_hands_sdpa_dense_rows_and_keeps_its_math(monkeypatch):
    """The memory-efficient SDPA kernel needs q/k/v with a dense last dim; the math stays causal softmax(qk^T/sqrt c)v."""
    block = vae_mod.AttnBlock(32).double().eval()
    x = torch.randn(1, 32, 2, 3, 4, dtype=torch.float64)
    real, seen = torch.nn.functional.scaled_dot_product_attention, []

    def recording(q, k, v, **kwargs):
        seen.append(all(t.is_contiguous() and t.stride(-1) == 1 for t in (q, k, v)))
        return real(q, k, v, **kwargs)
    monkeypatch.setattr(vae_mod.F, "scaled_dot_product_attention", recording)
    out = block(x)
    assert seen == [True]
    normed = block.norm(x)
    q, k, v = (p(normed).flatten(2).transpose(1, 2) for p in (block.q, block.k, block.v))   # (b, t*h*w, c)
    scores = q @ k.transpose(1, 2) / 32 ** 0.5
    scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
    assert_close(out, block.proj_out(attn, residual=x), atol=1e-10, what="attention")


def test_generation_opens_the_vae_without_its_encoder(tmp_path):
    from lowvram_stepvideo.loading.loaders import open_vae
    state = AutoencoderKL(tiny_encoder_config(), with_encoder=True).state_dict()
    stored = {k.replace("decoder.conv_out.conv.", "decoder.conv_out."): v for k, v in state.items()}
    raw = {"z_channels": 4, "encoder": {"ch": 32, "ch_mult": [1, 1, 1, 1], "present": True},
           "decoder": {"ch": 32, "ch_mult": [2, 1, 1, 1]}}
    folder = write_vae_folder(tmp_path / "vae", raw, stored)
    assert open_vae(folder).module.encoder is not None              # validation sees every tensor
    decoder_only = open_vae(folder, with_encoder=False)
    decoder_only.check()                                            # the encoder's tensors are skipped, not missing
    vae = decoder_only.load(torch.float32)
    assert vae.encoder is None
    assert torch.equal(vae.decoder.conv_out.conv.weight, state["decoder.conv_out.conv.weight"])
    from lowvram_stepvideo.loading.model_folder import ModelFolder
    import dataclasses
    fields = {f.name: None for f in dataclasses.fields(ModelFolder)} | {"root": tmp_path}
    assert ModelFolder(**fields).open("vae").module.encoder is None   # what the pipeline loads to decode
