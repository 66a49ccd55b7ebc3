"""Model folders at full size (zero-weight sparse release from tests/sparse_release.py, 2 layers) and
on the tiny fixture: lazy loads with bounded memory, validation, and one-line ModelFolderError on broken folders."""
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import RELEASE_MODEL, ROOT, link_tree, manifest_shapes

from lowvram_stepvideo.loading.loaders import open_clip, open_dit, open_step_llm, open_vae
from lowvram_stepvideo.loading.model_folder import ModelFolderError, open_model_folder
from lowvram_stepvideo.loading.loaders import load_dit
from sparse_release import write_sparse_release

LAYERS = 2
MAX_PEAK_RSS = 2 * 2**30
MAX_LOAD_SECONDS = 30
OPENERS = {"transformer": open_dit, "step_llm": open_step_llm, "hunyuan_clip": open_clip, "vae": open_vae}
MANIFEST_NAMES = {"transformer": "transformer", "step_llm": "step_llm", "hunyuan_clip": "hunyuan_clip",
                  "vae": "vae_v2"}

# Loads every component of a model folder in bf16 and prints, per component, seconds, the process's peak RSS so far
# and the loaded names/shapes/dtypes as JSON.
CHILD = r"""
import gc, json, resource, sys, time
import torch
from lowvram_stepvideo.loading.loaders import load_clip, load_dit, load_step_llm, load_vae
root, report = sys.argv[1], {"baseline_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
for name, load in [("transformer", load_dit), ("step_llm", load_step_llm), ("hunyuan_clip", load_clip),
                   ("vae", load_vae)]:
    t0 = time.perf_counter()
    model = load(f"{root}/{name}", dtype=torch.bfloat16)
    seconds = time.perf_counter() - t0
    state = model.state_dict()
    report[name] = {"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                    "shapes": {k: list(v.shape) for k, v in state.items()},
                    "dtypes": sorted({str(v.dtype) for v in state.values()})}
    del model, state
    gc.collect()
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def sparse_release(tmp_path_factory) -> Path:
    return write_sparse_release(tmp_path_factory.mktemp("sparse") / "stepvideo-t2v", layers=LAYERS)


def in_kept_layers(key: str) -> bool:
    m = re.match(r"(transformer_blocks|transformer\.layers)\.(\d+)\.", key)
    return m is None or int(m.group(2)) < LAYERS


def expected_module_shapes(folder: Path, component: str) -> dict[str, list[int]]:
    """The manifest's tensors of the kept layers, under the names the component's module uses."""
    rename = OPENERS[component](folder / component).rename
    shapes = {rename(k): list(s) for k, s in manifest_shapes(MANIFEST_NAMES[component]).items() if in_kept_layers(k)}
    return {k: s for k, s in shapes.items() if k is not None}


def assert_one_line(error: Exception, *needles: str) -> None:
    msg = str(error)
    assert "\n" not in msg and len(msg) < 600, msg
    assert error.__context__ is None or error.__suppress_context__, "chained traceback"
    for needle in needles:
        assert needle in msg, f"{needle!r} not in: {msg}"


# ---------------------------------------------------------------- full size, sparse

@pytest.mark.slow
def test_sparse_release_loads_lazily_with_bounded_memory(sparse_release):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", CHILD, str(sparse_release)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for component in OPENERS:
        got = report[component]
        assert got["seconds"] < MAX_LOAD_SECONDS, (component, got["seconds"])
        assert got["peak_rss"] < MAX_PEAK_RSS, f"{component}: peak RSS {got['peak_rss'] / 2**30:.2f} GiB"
        assert got["dtypes"] == ["torch.bfloat16"], (component, got["dtypes"])
        assert got["shapes"] == expected_module_shapes(sparse_release, component), component


def test_sparse_release_is_full_size(sparse_release):
    """The folder the load test used really holds the released widths (only the block count is cut)."""
    shards = sorted((sparse_release / "transformer").glob("*.safetensors"))
    assert len(shards) > 1
    embed = sparse_release / "hunyuan_clip" / "clip_text_encoder" / "model.safetensors"
    assert embed.stat().st_size > 1.3e9     # the float32 CLIP tower is not cut by --layers
    llm = json.loads((sparse_release / "step_llm" / "config.json").read_text())
    assert llm["hidden_size"] == 6144 and llm["num_layers"] == LAYERS


def test_open_model_folder_validates_sparse_release(sparse_release):
    t0 = time.perf_counter()
    folder = open_model_folder(sparse_release)
    assert time.perf_counter() - t0 < 20
    assert folder.weight_format == "bf16" and not folder.turbo
    assert [f.name for f in folder.files("transformer")] == sorted(
        f.name for f in (sparse_release / "transformer").glob("*.safetensors"))


def test_missing_folder_says_how_to_download(tmp_path):
    with pytest.raises(ModelFolderError) as info:
        open_model_folder(tmp_path / "stepvideo-t2v")
    assert_one_line(info.value, str(tmp_path / "stepvideo-t2v"), "download", "stepfun-ai/stepvideo-t2v")


@pytest.mark.parametrize("which", ["empty", "component_folder"])
def test_not_a_step_video_folder(sparse_release, tmp_path, which):
    root = tmp_path if which == "empty" else sparse_release / "transformer"
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelFolderError) as info:
        open_model_folder(root)
    assert_one_line(info.value, "not a Step-Video model folder", "step_llm", "--model-dir")


def truncate_sparse(path: Path) -> None:
    """Replace `path` by a copy of its header whose data stops half way (a sparse file: no data written)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        head = struct.pack("<Q", n) + f.read(n)
    size = path.stat().st_size
    path.unlink()
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size // 2)


def test_truncated_shard(sparse_release, tmp_path):
    root = link_tree(sparse_release, tmp_path / "stepvideo-t2v")
    shard = sorted((root / "transformer").glob("*.safetensors"))[2]
    truncate_sparse(shard)
    with pytest.raises(ModelFolderError) as info:
        open_model_folder(root)
    assert_one_line(info.value, shard.name, "truncated", "re-download")


@pytest.mark.parametrize("damage", ["missing_shard", "missing_tokenizer", "missing_vae", "bad_model_index"])
def test_other_damage(sparse_release, tmp_path, damage):
    root = link_tree(sparse_release, tmp_path / "stepvideo-t2v")
    victim = {"missing_shard": root / "step_llm" / "model-00003-of-00009.safetensors",
              "missing_tokenizer": root / "step_llm" / "step1_chat_tokenizer.model",
              "missing_vae": root / "vae" / "vae_v2.safetensors",
              "bad_model_index": root / "model_index.json"}[damage]
    victim.unlink()
    if damage == "bad_model_index":
        victim.write_text("{")
    with pytest.raises(ModelFolderError) as info:
        open_model_folder(root)
    assert_one_line(info.value, victim.name)


# ---------------------------------------------------------------- tiny fixture folder

def tiny_model_folder(fixture_dir: Path, dst: Path) -> Path:
    """The fixture's model_dir plus the release tokenizers (the fixture ships none)."""
    root = link_tree(fixture_dir / "model_dir", dst)
    shutil.copyfile(RELEASE_MODEL / "step_llm" / "step1_chat_tokenizer.model",
                    root / "step_llm" / "step1_chat_tokenizer.model")
    link_tree(RELEASE_MODEL / "hunyuan_clip" / "tokenizer", root / "hunyuan_clip" / "tokenizer")
    return root


def test_tiny_folder_opens_and_loads_like_the_loaders(fixture_dir, tmp_path):
    root = tiny_model_folder(fixture_dir, tmp_path / "stepvideo-t2v-turbo")
    folder = open_model_folder(root)
    assert folder.weight_format == "bf16" and folder.turbo       # recognised by the folder name
    got = folder.open("transformer").load(torch.bfloat16).state_dict()
    ref = load_dit(fixture_dir / "model_dir" / "transformer", dtype=torch.bfloat16).state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    ids, mask = folder.step_llm_tokenizer()("a cat")
    assert ids.shape == mask.shape and ids.shape[0] == 1


def test_tiny_folder_without_tokenizers_fails_naming_the_file(fixture_dir, tmp_path):
    root = link_tree(fixture_dir / "model_dir", tmp_path / "stepvideo-t2v")
    with pytest.raises(ModelFolderError) as info:
        open_model_folder(root)
    assert_one_line(info.value, "step1_chat_tokenizer.model", "copy it")



def test_turbo_is_carried_by_the_quantized_header_not_the_name(fixture_dir, tmp_path):
    """quantize.py records in the DiT header whether its source was turbo; the header wins over the folder name."""
    from lowvram_stepvideo.tools.quantize_folder import quantize_folder
    turbo_src = tiny_model_folder(fixture_dir, tmp_path / "stepvideo-t2v-turbo")
    plain_src = tiny_model_folder(fixture_dir, tmp_path / "stepvideo-t2v")
    quantize_folder(turbo_src, tmp_path / "q-int8", "int8", log=lambda msg: None)
    quantize_folder(plain_src, tmp_path / "renamed-turbo-int8", "int8", log=lambda msg: None)
    assert open_model_folder(tmp_path / "q-int8").turbo
    assert not open_model_folder(tmp_path / "renamed-turbo-int8").turbo
