"""The loading layer on the tiny fixture folder: strict one-line errors on broken folders, sharded == single file,
and laziness (loaded tensors are views of the file mapping; forwards and in-place writes never touch the file)."""
import hashlib
import json
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import link_tree, read_io
from safetensors.torch import save_file

from lowvram_stepvideo.files.weights import CheckpointError
from lowvram_stepvideo.files.configs import ConfigError
from lowvram_stepvideo.loading.loaders import load_clip, load_dit, load_step_llm, load_vae

DIT_INPUTS = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_2",
              "encoder_attention_mask")
FIX_HINT = re.compile(r"re-download|pass the|wrong folder|check the path|use the")


@dataclass(frozen=True)
class Part:
    folder: str                     # under model_dir; what the loader is given
    loader: Callable
    weights: str                    # weight file, relative to `folder`
    config: str                     # config file, relative to `folder`
    layers_key: str                 # config key counting repeated blocks
    width: tuple[str, int]          # config key and a value that changes some tensor's shape
    file_dtype: torch.dtype
    wrong_folder: str               # another component's folder, and what the error then names
    wrong_needle: str


PARTS = {
    "dit": Part("transformer", load_dit, "diffusion_pytorch_model.safetensors", "config.json", "num_layers",
                ("in_channels", 8), torch.bfloat16, "step_llm", "config.json"),
    "step_llm": Part("step_llm", load_step_llm, "model.safetensors", "config.json", "num_layers",
                     ("padded_vocab_size", 1024), torch.bfloat16, "transformer", "config.json"),
    "clip": Part("hunyuan_clip", load_clip, "clip_text_encoder/model.safetensors", "clip_text_encoder/config.json",
                 "num_hidden_layers", ("intermediate_size", 128), torch.float32, "vae", "config.json"),
    "vae": Part("vae", load_vae, "vae_v2.safetensors", "config.json", "num_res_blocks", ("z_channels", 8),
                torch.bfloat16, "hunyuan_clip", "vae_v2.safetensors"),
}


# ---------------------------------------------------------------- folder surgery (never writes a fixture file)

def clone_model_dir(fixture_dir: Path, dst: Path) -> Path:
    """Hard links to every file of the fixture's model_dir under dst (edits must replace files)."""
    return link_tree(fixture_dir / "model_dir", dst)


def replace_bytes(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def rewrite_weights(path: Path, change: Callable[[dict], None]) -> None:
    tensors, metadata = read_io(path)
    change(tensors)
    path.unlink()
    save_file(tensors, str(path), metadata=metadata or None)


def edit_config(path: Path, key: str, value) -> None:
    raw = json.loads(path.read_text())
    raw[key] = value(raw[key]) if callable(value) else value
    path.unlink()
    path.write_text(json.dumps(raw))


def shard_weights(path: Path, parts: int = 2) -> list[Path]:
    """Split a single-file component into `parts` shards + `{stem}.safetensors.index.json`; removes the file."""
    tensors, _ = read_io(path)
    keys = list(tensors)
    stem = path.name.removesuffix(".safetensors")
    shards, weight_map = [], {}
    for i in range(parts):
        shard = path.parent / f"{stem}-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = keys[i * len(keys) // parts:(i + 1) * len(keys) // parts]
        save_file({k: tensors[k] for k in chunk}, str(shard), metadata={"format": "pt"})
        weight_map.update({k: shard.name for k in chunk})
        shards.append(shard)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path.parent / f"{stem}.safetensors.index.json").write_text(json.dumps(index))
    path.unlink()
    return shards


def header_of(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def probe_key(path: Path) -> str:
    """A tensor from the middle of the file whose name the loaders do not rename."""
    keys = sorted(read_io(path)[0])
    return next(k for k in keys[len(keys) // 2:] if "conv_out" not in k and "position_ids" not in k)


# ---------------------------------------------------------------- breakages
# each takes (component folder, part), breaks it and returns (folder to load, what the error must name)

def missing_folder(folder, part):
    return folder.parent / "no_such_folder" / part.folder, "no_such_folder"


def missing_config(folder, part):
    (folder / part.config).unlink()  # the VAE falls back to release widths, which then do not fit the tiny file
    return folder, "config.json"


def missing_weights(folder, part):
    (folder / part.weights).unlink()
    return folder, Path(part.weights).name


def truncated_data(folder, part):
    f = folder / part.weights
    data = f.read_bytes()
    replace_bytes(f, data[:len(data) // 2])
    return folder, f.name


def truncated_header(folder, part):
    f = folder / part.weights
    replace_bytes(f, f.read_bytes()[:5])
    return folder, f.name


def garbage_length(folder, part):
    f = folder / part.weights
    replace_bytes(f, b"\xde\xad\xbe\xef" * 16 + f.read_bytes()[64:])
    return folder, f.name


def garbage_json(folder, part):
    f = folder / part.weights
    data = f.read_bytes()
    replace_bytes(f, data[:8] + b"\xff" * 32 + data[40:])
    return folder, f.name


def wrong_shape_in_header(folder, part):
    """Valid JSON whose shape no longer fits the tensor's byte range."""
    f = folder / part.weights
    header, body = header_of(f)
    name = probe_key(f)
    header[name]["shape"][-1] += 1
    raw = json.dumps(header).encode()
    replace_bytes(f, struct.pack("<Q", len(raw)) + raw + body)
    return folder, name


def missing_tensor(folder, part):
    name = probe_key(folder / part.weights)
    rewrite_weights(folder / part.weights, lambda t: t.pop(name))
    return folder, name.removeprefix("bert.")


def extra_tensor(folder, part):
    rewrite_weights(folder / part.weights, lambda t: t.__setitem__("extra_tensor.weight", torch.zeros(2)))
    return folder, "extra_tensor.weight"


def more_layers_in_config(folder, part):
    edit_config(folder / part.config, part.layers_key, lambda n: n + 1)
    return folder, "missing tensor"


def fewer_layers_in_config(folder, part):
    edit_config(folder / part.config, part.layers_key, lambda n: n - 1)
    return folder, "unexpected tensor"


def other_width_in_config(folder, part):
    edit_config(folder / part.config, *part.width)
    return folder, Path(part.weights).name


def wrong_component(folder, part):
    return folder.parent / part.wrong_folder, part.wrong_needle


def missing_shard(folder, part):
    shards = shard_weights(folder / part.weights)
    shards[1].unlink()
    return folder, shards[1].name


def unreadable_index(folder, part):
    shard_weights(folder / part.weights)
    index = next((folder / part.weights).parent.glob("*.index.json"))
    index.write_text("{not json")
    return folder, index.name


BREAKAGES = [missing_folder, missing_config, missing_weights, truncated_data, truncated_header, garbage_length,
             garbage_json, wrong_shape_in_header, missing_tensor, extra_tensor, more_layers_in_config,
             fewer_layers_in_config, other_width_in_config, wrong_component, missing_shard, unreadable_index]


def assert_one_line_error(error: Exception, needle: str) -> None:
    msg = str(error)
    assert isinstance(error, (CheckpointError, ConfigError)), repr(error)
    assert "\n" not in msg and len(msg) < 600, msg
    assert needle in msg, f"{needle!r} not named in: {msg}"
    assert FIX_HINT.search(msg), f"no fix suggested in: {msg}"
    assert error.__context__ is None or error.__suppress_context__, "chained traceback"


@pytest.mark.parametrize("breakage", BREAKAGES, ids=[b.__name__ for b in BREAKAGES])
@pytest.mark.parametrize("part", PARTS.values(), ids=list(PARTS))
def test_broken_folder_gives_one_line_error(fixture_dir, tmp_path, part, breakage):
    model_dir = clone_model_dir(fixture_dir, tmp_path / "model_dir")
    assert part.loader(model_dir / part.folder) is not None   # the intact clone loads
    folder, needle = breakage(model_dir / part.folder, part)
    with pytest.raises((CheckpointError, ConfigError)) as info:
        part.loader(folder)
    assert_one_line_error(info.value, needle)


def test_truncated_clip_pickle_gives_one_line_error(fixture_dir, tmp_path):
    """The release ships the CLIP as a torch pickle (pytorch_model.bin)."""
    folder = clone_model_dir(fixture_dir, tmp_path / "model_dir") / "hunyuan_clip"
    st = folder / "clip_text_encoder" / "model.safetensors"
    tensors, _ = read_io(st)
    st.unlink()
    pickle = folder / "clip_text_encoder" / "pytorch_model.bin"
    torch.save(tensors, pickle)
    assert torch.equal(load_clip(folder).state_dict()["pooler.dense.weight"], tensors["pooler.dense.weight"])
    replace_bytes(pickle, pickle.read_bytes()[:pickle.stat().st_size // 2])
    with pytest.raises(CheckpointError) as info:
        load_clip(folder)
    assert_one_line_error(info.value, "pytorch_model.bin")


# ---------------------------------------------------------------- sharded == single file

@pytest.mark.parametrize("part", PARTS.values(), ids=list(PARTS))
def test_sharded_folder_loads_the_same_tensors(fixture_dir, tmp_path, part):
    folder = clone_model_dir(fixture_dir, tmp_path / "model_dir") / part.folder
    shards = shard_weights(folder / part.weights, parts=2)
    sharded = part.loader(folder, dtype=part.file_dtype)
    single = part.loader(fixture_dir / "model_dir" / part.folder, dtype=part.file_dtype)
    assert {ref.file for ref in sharded.weight_refs.values()} == set(shards)
    a, b = sharded.state_dict(), single.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@torch.inference_mode()
def test_sharded_dit_forward_equals_single_file(fixture_dir, tmp_path):
    folder = clone_model_dir(fixture_dir, tmp_path / "model_dir") / "transformer"
    shard_weights(folder / "diffusion_pytorch_model.safetensors", parts=2)
    io, _ = read_io(fixture_dir / "dit_io.safetensors")
    inputs = [io[f"in.{k}"] for k in DIT_INPUTS]
    out_sharded = load_dit(folder, dtype=torch.float32)(*inputs)
    out_single = load_dit(fixture_dir / "model_dir" / "transformer", dtype=torch.float32)(*inputs)
    assert torch.equal(out_sharded, out_single)


# ---------------------------------------------------------------- laziness

def file_views(model) -> dict[Path, set[int]]:
    """For each file, the base addresses of the storages its tensors live in; asserts each tensor is the file's
    bytes at the header's offset inside a mapping of the whole file."""
    state, bases = model.state_dict(), {}
    for name, ref in model.weight_refs.items():
        t = state[name]
        storage = t.untyped_storage()
        assert storage.nbytes() == ref.file.stat().st_size, f"{name} is not a view of {ref.file.name}"
        assert t.data_ptr() - storage.data_ptr() == ref.start, name
        bases.setdefault(ref.file, set()).add(storage.data_ptr())
    return bases


@pytest.mark.parametrize("part", PARTS.values(), ids=list(PARTS))
def test_load_in_file_dtype_is_a_view_of_the_mapping(fixture_dir, part):
    model = part.loader(fixture_dir / "model_dir" / part.folder, dtype=part.file_dtype)
    bases = file_views(model)
    assert len(bases) == 1 and all(len(b) == 1 for b in bases.values()), "one mapping per file expected"


def test_sharded_load_maps_each_shard_once(fixture_dir, tmp_path):
    folder = clone_model_dir(fixture_dir, tmp_path / "model_dir") / "transformer"
    shards = shard_weights(folder / "diffusion_pytorch_model.safetensors", parts=2)
    bases = file_views(load_dit(folder, dtype=torch.bfloat16))
    assert set(bases) == set(shards) and all(len(b) == 1 for b in bases.values())


def test_cast_load_copies(fixture_dir):
    """The check above can fail: a bf16 file loaded in float32 is a copy, not a view."""
    model = load_dit(fixture_dir / "model_dir" / "transformer", dtype=torch.float32)
    with pytest.raises(AssertionError, match="is not a view"):
        file_views(model)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_forward_and_inplace_writes_leave_the_file_untouched(fixture_dir, tmp_path):
    src = fixture_dir / "model_dir" / "transformer"
    folder = tmp_path / "transformer"
    folder.mkdir()
    for f in src.iterdir():
        shutil.copyfile(f, folder / f.name)   # a real copy: this test writes to the mapped tensors
    weights = folder / "diffusion_pytorch_model.safetensors"
    before = sha256(weights)
    model = load_dit(folder, dtype=torch.bfloat16)
    io, _ = read_io(fixture_dir / "dit_io.safetensors")
    with torch.inference_mode():
        out = model(*[io[f"in.{k}"].to(torch.bfloat16) for k in DIT_INPUTS])
    assert out.isfinite().all()
    assert sha256(weights) == before
    for p in model.parameters():
        p.add_(1)                              # copy-on-write: the mapping is private
    assert sha256(weights) == before
    stored = read_io(weights)[0]["proj_out.weight"]
    assert torch.equal(model.proj_out.weight, stored + 1) and not torch.equal(model.proj_out.weight, stored)
