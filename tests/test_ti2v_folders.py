"""Step-Video-TI2V folders: recognised by their transformer config and patch-embedding shape, loaded strictly,
quantized with T2V's guarantees (the condition path included)."""
import json
import math
import shutil

import pytest
import torch
from conftest import RELEASE, complete_model_dir, fixture_dirs, manifest_shapes, read_io, ti2v_fixture

from sparse_release import write_sparse_release
from lowvram_stepvideo.pipeline.preview_map import STORED_NAME, PreviewMap, preview_map_for
from lowvram_stepvideo.loading.loaders import load_dit
from lowvram_stepvideo.loading.model_folder import ModelFolderError, open_model_folder
from lowvram_stepvideo.models import quant
from lowvram_stepvideo.tools.quantize_folder import quantize_folder

FIXTURE = ti2v_fixture()
LIMITS = {"int8": 0.020, "fp8": 0.075}   # as for T2V (test_quantize_cli.py): relative Frobenius error
DIT_INPUTS = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_2", "encoder_attention_mask")


def _writable(src, dst):
    """A writable copy of a fixture model folder with the release tokenizers."""
    links = dst.parent / (dst.name + "-links")
    links.mkdir()
    shutil.copytree(complete_model_dir(src, links), dst, copy_function=shutil.copyfile)
    return dst


def test_folders_are_recognised_by_kind(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ti2v = open_model_folder(complete_model_dir(FIXTURE, tmp_path / "a"))
    t2v = open_model_folder(complete_model_dir(fixture_dirs()[0], tmp_path / "b"))
    assert (ti2v.kind, t2v.kind) == ("ti2v", "t2v")
    assert ti2v.open("vae_encoder").module.decoder is None
    assert ti2v.open("vae").module.encoder is None          # the decode phase loads the decoder alone


@pytest.mark.parametrize("flag", [True, False])
def test_config_of_the_other_kind_is_refused_naming_both(tmp_path, flag):
    """A TI2V config over T2V weights, and a T2V config over TI2V weights: one line, naming the kinds."""
    src = FIXTURE if not flag else fixture_dirs()[0]
    folder = _writable(src, tmp_path / "m")
    config_path = folder / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["use_additional_conditions"] = flag
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelFolderError) as e:
        open_model_folder(folder)
    msg = str(e.value)
    assert "\n" not in msg and "pos_embed.proj.weight" in msg and f"use_additional_conditions {str(flag).lower()}" in msg
    assert ("Step-Video-T2V's" if flag else "Step-Video-TI2V's") in msg


def test_ti2v_folder_without_vae_encoder_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    folder = _writable(FIXTURE, tmp_path / "m")
    vae = folder / "vae" / "vae_v2.safetensors"
    save_file({k: v for k, v in load_file(vae).items() if not k.startswith("encoder.")}, vae)
    with pytest.raises(ModelFolderError, match="no VAE encoder weights"):
        open_model_folder(folder)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantized_ti2v_folder_loads_strictly_and_matches_the_reference(tmp_path, fmt):
    src = _writable(FIXTURE, tmp_path / "src")
    dst = tmp_path / f"q-{fmt}"
    quantize_folder(src, dst, fmt, log=lambda m: None)
    folder = open_model_folder(dst)
    assert (folder.kind, folder.weight_format) == ("ti2v", fmt)
    stored = PreviewMap.load(dst / "vae" / STORED_NAME)     # the live preview's map, fitted once by quantize.py
    assert not (src / "vae" / STORED_NAME).exists()       # (vae/ is hard-linked: the source's folder is untouched)

    def no_fit(folder):
        raise AssertionError("the stored map should be used")
    used = preview_map_for(dst / "vae", tmp_path / "cache", fit=no_fit)
    assert torch.equal(used.weight, stored.weight) and torch.equal(used.bias, stored.bias)
    dit = load_dit(dst / "transformer", dtype=torch.float32)
    emb = dit.adaln_single.emb
    assert isinstance(emb.motion_score_embedder.linear_2, quant.QuantLinear)
    assert not isinstance(emb.motion_score_embedder.linear_1, quant.QuantLinear)
    assert dit.pos_embed.proj.weight.shape[1] == 8 and dit.pos_embed.proj.weight.dtype == torch.float32
    io, meta = read_io(FIXTURE / "dit_io.safetensors")
    with torch.inference_mode():
        out = dit(*[io[f"in.{k}"] for k in DIT_INPUTS], condition_hidden_states=io["in.condition_hidden_states"],
                  motion_score=torch.full((2,), float(meta["motion_score"])))
    err = ((out - io["out.x"]).norm() / io["out.x"].norm()).item()
    assert err <= LIMITS[fmt], err
    encoder = folder.open("vae_encoder").load(torch.float32)   # the VAE (encoder included) is carried as is
    assert encoder.encoder is not None


def test_full_size_ti2v_dit_quantized_is_within_one_percent_of_half():
    delta = json.loads((RELEASE / "stepvideo-ti2v" / "transformer_delta.json").read_text())
    shapes = dict(manifest_shapes("transformer"))
    shapes.update({k: tuple(v) for k, v in delta["added"].items()})
    shapes.update({k: tuple(v["ti2v"]) for k, v in delta["changed_shape_from_t2v"].items()})
    plan = quant.plan_quantization("transformer", shapes)
    assert "adaln_single.emb.motion_score_embedder.linear_2.weight" in plan
    out = sum(math.prod(s) + 4 * s[0] if k in plan else 2 * math.prod(s) for k, s in shapes.items())
    half = sum(2 * math.prod(s) for s in shapes.values()) / 2
    assert abs(out / half - 1) <= 0.01


# ---- the full-size release, as zero-weight sparse files ----------------------------------------------------------

@pytest.fixture(scope="module")
def sparse_ti2v(tmp_path_factory):
    out = tmp_path_factory.mktemp("sparse-ti2v") / "stepvideo-ti2v"
    return write_sparse_release(out, variant="ti2v")


def test_full_size_ti2v_release_loads_strictly(sparse_ti2v):
    folder = open_model_folder(sparse_ti2v)
    assert (folder.kind, folder.weight_format) == ("ti2v", "bf16")
    dit = folder.open("transformer").load(torch.bfloat16)
    assert dit.pos_embed.proj.weight.shape == (6144, 128, 1, 1) and len(dit.transformer_blocks) == 48
    assert dit.adaln_single.emb.motion_score_embedder.linear_2.weight.shape == (6144, 6144)
    encoder = folder.open("vae_encoder").load(torch.bfloat16)
    assert encoder.decoder is None and sum(p.numel() for p in encoder.parameters()) == 109_885_696


@pytest.mark.slow
def test_full_size_ti2v_release_quantizes(tmp_path):
    """(2 of the 48 blocks: converting 60 GB of zeros would take minutes and prove nothing more.)"""
    src = tmp_path / "stepvideo-ti2v"
    write_sparse_release(src, layers=2, variant="ti2v")
    quantize_folder(src, tmp_path / "int8", "int8", components=("transformer",), log=lambda m: None,
                    preview_map=False)     # (a minute of fitting on the zero VAE would prove nothing)
    folder = open_model_folder(tmp_path / "int8")
    assert (folder.kind, folder.weight_format) == ("ti2v", "int8")
    dit = folder.open("transformer").load(torch.bfloat16)
    assert isinstance(dit.adaln_single.emb.motion_score_embedder.linear_2, quant.QuantLinear)


CARDS = {"cpu": None, "cpu-lowram": None, "8gb": 8, "12gb": 12, "16gb": 16, "24gb": 24, "48gb": 48, "80gb": 80}


@pytest.mark.parametrize("profile", [pytest.param(p, marks=[] if p == "8gb" else pytest.mark.slow) for p in CARDS])
def test_full_size_dry_run_plans_102_frames_on_every_profiles_card(sparse_ti2v, profile, capsys):
    from cli_support import run_cli
    from lowvram_stepvideo.profiles import load_profile
    args = ["--model-dir", sparse_ti2v, "--profile", profile, "--prompt", "x", "--dry-run", "--ram-gib", "64"]
    if CARDS[profile]:
        args += ["--vram-gib", str(CARDS[profile])]
    if load_profile(profile).weight_format != "bf16":
        args += ["--assume-format", load_profile(profile).weight_format]
    rc, out, err = run_cli(capsys, *args)
    assert rc == 0, err
    assert "102x544x992" in out and "\nimage " in out and "verdict: fits" in out, out
