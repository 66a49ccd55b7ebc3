"""hunyuan_clip (BertModel): reference fixtures, full-size layout, loading from .bin / .safetensors variants."""
import shutil

import pytest
import torch
from conftest import RELEASE_MODEL, manifest_shapes, read_io
from safetensors.torch import save_file

from lowvram_stepvideo.loading.assign import build_on_meta
from lowvram_stepvideo.files.configs import ClipConfig
from lowvram_stepvideo.loading.loaders import load_clip
from lowvram_stepvideo.models.clip import BertModel

ATOL = 1e-4


def _tiny_folder(fixture_dir):
    return fixture_dir / "model_dir" / "hunyuan_clip"


@pytest.mark.parametrize("run", ["", "ids_only."])
@torch.no_grad()
def test_tiny_matches_reference(fixture_dir, run):
    io, _ = read_io(fixture_dir / "text_io.safetensors")
    model = load_clip(_tiny_folder(fixture_dir))
    h = model(io[f"in.{run}clip.input_ids"], io[f"in.{run}clip.attention_mask"])
    torch.testing.assert_close(h, io[f"out.{run}clip.last_hidden_state"], atol=ATOL, rtol=0)
    torch.testing.assert_close(model.pooled_output(h), io[f"out.{run}clip.pooler_output"], atol=ATOL, rtol=0)


def test_full_size_names_and_shapes_match_release():
    config = ClipConfig.from_file(RELEASE_MODEL / "hunyuan_clip" / "clip_text_encoder" / "config.json")
    model = build_on_meta(lambda: BertModel(config, with_pooler=True))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == manifest_shapes("hunyuan_clip")


def _variant_folders(fixture_dir, tmp_path):
    """(a) release-style pytorch_model.bin: `bert.` prefix, old position_ids buffer, no pooler;
    (b) model.safetensors with the plain keys."""
    src = _tiny_folder(fixture_dir) / "clip_text_encoder"
    state = {k: v.clone() for k, v in load_clip(src).state_dict().items()}
    a, b = tmp_path / "a" / "clip_text_encoder", tmp_path / "b" / "clip_text_encoder"
    for folder in (a, b):
        folder.mkdir(parents=True)
        shutil.copy(src / "config.json", folder / "config.json")
    bin_state = {f"bert.{k}": v for k, v in state.items() if not k.startswith("pooler.")}
    n_pos = state["embeddings.position_embeddings.weight"].shape[0]
    bin_state["bert.embeddings.position_ids"] = torch.arange(n_pos)[None]
    torch.save(bin_state, a / "pytorch_model.bin")
    save_file(state, str(b / "model.safetensors"))
    return a.parent, b.parent


@torch.no_grad()
def test_bin_and_safetensors_variants_load_and_agree(fixture_dir, tmp_path):
    io, _ = read_io(fixture_dir / "text_io.safetensors")
    ids, mask = io["in.clip.input_ids"], io["in.clip.attention_mask"]
    folder_bin, folder_st = _variant_folders(fixture_dir, tmp_path)
    from_bin, from_st = load_clip(folder_bin), load_clip(folder_st)
    assert from_bin.pooler is None and from_st.pooler is not None
    h_bin = from_bin(ids, mask)
    torch.testing.assert_close(h_bin, from_st(ids, mask), atol=0, rtol=0)
    torch.testing.assert_close(h_bin, io["out.clip.last_hidden_state"], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="no pooler"):
        from_bin.pooled_output(h_bin)
