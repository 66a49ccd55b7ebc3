"""A full-size Step-Video release folder whose weights read as zeros and take no disk: every tensor of the
in-repo manifest (tests/data/release/state_dict_manifest.json) with its released name, shape and dtype, in the
released file layout, each file a safetensors header followed by a sparse hole (the file is extended, no data is
written). Loaders, quantizers and memory planners see the real scale (~100 GB apparent) for a few MB of disk.

    python tests/sparse_release.py OUT [--layers N] [--components transformer,step_llm,hunyuan_clip,vae]
                                       [--variant t2v|ti2v]

Layout: model_index.json and scheduler/ as released; transformer/ in 6 shards and step_llm/ in 9 (the release's
counts, from the manifest) with their index json; step_llm's sentencepiece tokenizer; hunyuan_clip/tokenizer/ and
clip_text_encoder/config.json, whose weights are written as model.safetensors (the release ships a torch pickle,
pytorch_model.bin); vae/vae_v2.safetensors. --layers N keeps the first N DiT blocks and step_llm layers and says so
in their config.json; --variant ti2v writes the image-to-video release's DiT (its config and the tensors
tests/data/release/stepvideo-ti2v/transformer_delta.json changes). Standard library only.
"""
import argparse
import json
import math
import re
import shutil
import struct
from pathlib import Path

RELEASE = Path(__file__).resolve().parent / "data" / "release"
COMPONENTS = ("transformer", "step_llm", "hunyuan_clip", "vae")
SAFETENSORS_DTYPES = {"bfloat16": ("BF16", 2), "float16": ("F16", 2), "float32": ("F32", 4)}
BLOCK_KEY = re.compile(r"^(?:transformer_blocks|transformer\.layers)\.(\d+)\.")


def _nbytes(shape, dtype: str) -> int:
    return math.prod(shape) * SAFETENSORS_DTYPES[dtype][1]


def write_sparse_safetensors(path: Path, tensors: list[tuple[str, list[int]]], dtype: str,
                             metadata: dict | None = None) -> int:
    """One safetensors file of `tensors` (name, shape), all of `dtype`, data left as a hole; returns data bytes."""
    code = SAFETENSORS_DTYPES[dtype][0]
    header, end = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name, shape in tensors:
        start, end = end, end + _nbytes(shape, dtype)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [start, end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)            # the data region starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + end)
    return end


def split_even(sizes: list[int], count: int) -> list[int]:
    """Where to cut a run of tensors of `sizes` bytes into min(count, len(sizes)) consecutive, non-empty shards of
    about equal bytes: the start index of every shard after the first."""
    n = min(count, len(sizes))
    total, cuts, start, acc = sum(sizes), [], 0, 0
    for k in range(1, n):
        end = start + 1                       # every shard holds at least one tensor and leaves one for each after it
        acc += sizes[start]
        while end < len(sizes) - (n - k) and acc + sizes[end] / 2 <= total * k / n:
            acc += sizes[end]
            end += 1
        cuts.append(end)
        start = end
    return cuts


def write_shards(folder: Path, stem: str, index_name: str, entries: list[dict], dtype: str, count: int) -> None:
    sizes = [_nbytes(e["shape"], dtype) for e in entries]
    bounds = [0, *split_even(sizes, count), len(entries)]
    parts = len(bounds) - 1
    weight_map, total = {}, 0
    for i in range(parts):
        name = f"{stem}-{i + 1:05d}-of-{parts:05d}.safetensors"
        part = entries[bounds[i]:bounds[i + 1]]
        total += write_sparse_safetensors(folder / name, [(e["key"], e["shape"]) for e in part], dtype,
                                          {"format": "pt"})
        weight_map.update(dict.fromkeys((e["key"] for e in part), name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / index_name).write_text(json.dumps(index, indent=2))


def shard_count(component: dict) -> int:
    """The release's shard count, from the manifest's description of its files ('...-0000N-of-00006...')."""
    return int(re.search(r"-of-(\d+)", component["file"]).group(1))


def keep_layers(entries: list[dict], layers: int | None) -> list[dict]:
    if layers is None:
        return entries
    return [e for e in entries if not (m := BLOCK_KEY.match(e["key"])) or int(m.group(1)) < layers]


def dit_entries(manifest: dict, variant: str) -> list[dict]:
    """The DiT's tensors: T2V's, or for TI2V with transformer_delta.json's changed shapes and added tensors (these go
    after the last adaln_single.emb tensor, beside the timestep embedder they extend)."""
    entries = [dict(e) for e in manifest["transformer"]["keys"]]
    if variant == "t2v":
        return entries
    delta = json.loads((RELEASE / "stepvideo-ti2v" / "transformer_delta.json").read_text())
    removed = set(delta.get("removed", []))
    entries = [e for e in entries if e["key"] not in removed]
    for e in entries:
        if e["key"] in delta["changed_shape_from_t2v"]:
            e["shape"] = delta["changed_shape_from_t2v"][e["key"]]["ti2v"]
    emb = [i for i, e in enumerate(entries) if e["key"].startswith("adaln_single.emb.")]
    at = emb[-1] + 1 if emb else len(entries)
    entries[at:at] = [{"key": k, "shape": s} for k, s in delta["added"].items()]
    assert len(entries) == delta["num_keys"], (len(entries), delta["num_keys"])
    return entries


def _config(src: Path, dst: Path, layers: int | None) -> None:
    config = json.loads(src.read_text())
    if layers is not None:
        config["num_layers"] = layers
    dst.write_text(json.dumps(config, indent=2))


def write_sparse_release(out: Path, layers: int | None = None, components=COMPONENTS, variant: str = "t2v") -> Path:
    """Write the folder (see the module docstring) to `out` and return it."""
    unknown = set(components) - set(COMPONENTS)
    if unknown or variant not in ("t2v", "ti2v"):
        raise ValueError(f"unknown components {sorted(unknown)} or variant {variant!r}")
    manifest = json.loads((RELEASE / "state_dict_manifest.json").read_text())
    t2v, out = RELEASE / "stepvideo-t2v", Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(t2v / "model_index.json", out / "model_index.json")
    shutil.copytree(t2v / "scheduler", out / "scheduler", dirs_exist_ok=True)
    if "transformer" in components:
        d = out / "transformer"
        d.mkdir(exist_ok=True)
        _config(RELEASE / f"stepvideo-{variant}" / "transformer" / "config.json", d / "config.json", layers)
        part = manifest["transformer"]
        write_shards(d, "diffusion_pytorch_model", "diffusion_pytorch_model.safetensors.index.json",
                     keep_layers(dit_entries(manifest, variant), layers), part["dtype"], shard_count(part))
    if "step_llm" in components:
        d = out / "step_llm"
        d.mkdir(exist_ok=True)
        _config(t2v / "step_llm" / "config.json", d / "config.json", layers)
        shutil.copyfile(t2v / "step_llm" / "step1_chat_tokenizer.model", d / "step1_chat_tokenizer.model")
        part = manifest["step_llm"]
        write_shards(d, "model", "model.safetensors.index.json", keep_layers(part["keys"], layers), part["dtype"],
                     shard_count(part))
    if "hunyuan_clip" in components:
        d = out / "hunyuan_clip"
        shutil.copytree(t2v / "hunyuan_clip" / "tokenizer", d / "tokenizer", dirs_exist_ok=True)
        (d / "clip_text_encoder").mkdir(parents=True, exist_ok=True)
        config = Path("clip_text_encoder") / "config.json"
        shutil.copyfile(t2v / "hunyuan_clip" / config, d / config)
        part = manifest["hunyuan_clip"]
        write_sparse_safetensors(d / "clip_text_encoder" / "model.safetensors",
                                 [(e["key"], e["shape"]) for e in part["keys"]], part["dtype"], {"format": "pt"})
    if "vae" in components:
        d = out / "vae"
        d.mkdir(exist_ok=True)
        part = manifest["vae_v2"]
        write_sparse_safetensors(d / "vae_v2.safetensors", [(e["key"], e["shape"]) for e in part["keys"]],
                                 part["dtype"])
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=None, help="keep the first N DiT blocks and step_llm layers")
    ap.add_argument("--components", default=",".join(COMPONENTS))
    ap.add_argument("--variant", choices=("t2v", "ti2v"), default="t2v")
    args = ap.parse_args(argv)
    try:
        out = write_sparse_release(args.out, args.layers, args.components.split(","), args.variant)
    except ValueError as e:
        ap.error(str(e))
    files = [f for f in out.rglob("*") if f.is_file()]
    apparent = sum(f.stat().st_size for f in files)
    used = sum(f.stat().st_blocks * 512 for f in files)
    print(f"wrote {out}: {apparent / 1e9:.1f} GB apparent, {used / 1e6:.1f} MB on disk")


if __name__ == "__main__":
    main()
