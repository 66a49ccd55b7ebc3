#!/usr/bin/env python3
"""Write the published releases' shapes that ship with the package (lowvram_stepvideo/release_shapes/), from the
release's configs and tensor manifest (../shared/release: state_dict_manifest.json, stepvideo-t2v/ configs,
stepvideo-ti2v/transformer_delta.json and its DiT config):

    python scripts/make_release_shapes.py [--release ../shared/release] [--out lowvram_stepvideo/release_shapes]

Per release folder (stepvideo-t2v, stepvideo-ti2v), per component: the release's config.json verbatim (the VAE ships
none) and tensors.json.gz, every tensor's name and shape with the component's dtype and file name. No tokenizers
and no weights: the memory plan needs neither. TI2V: T2V's tensors with the DiT differences of transformer_delta.json
applied and its own DiT config; its other components are T2V's.
"""
import argparse
import gzip
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "lowvram_stepvideo" / "release_shapes"
# component folder -> (manifest entry, file the release stores it in, safetensors dtype code, config path)
COMPONENTS = {
    "transformer": ("transformer", "diffusion_pytorch_model.safetensors", "BF16", "transformer/config.json"),
    "step_llm": ("step_llm", "model.safetensors", "BF16", "step_llm/config.json"),
    "hunyuan_clip": ("hunyuan_clip", "clip_text_encoder/pytorch_model.bin", "F32",
                     "hunyuan_clip/clip_text_encoder/config.json"),
    "vae": ("vae_v2", "vae_v2.safetensors", "BF16", None),
}


def tensors(manifest: dict, entry: str) -> list:
    return [[e["key"], e["shape"]] for e in manifest[entry]["keys"]]


def apply_delta(listed: list, delta: dict) -> list:
    shapes = dict((name, shape) for name, shape in listed)
    for name, change in delta["changed_shape_from_t2v"].items():
        shapes[name] = change["ti2v"]
    for name in delta["removed"]:
        shapes.pop(name)
    shapes.update(delta["added"])
    assert len(shapes) == delta["num_keys"], (len(shapes), delta["num_keys"])
    return [[name, shape] for name, shape in shapes.items()]


def write_release(out: Path, configs: dict, lists: dict) -> None:
    for component, (_, file, dtype, config) in COMPONENTS.items():
        folder = out / (config.rsplit("/", 1)[0] if config else component)
        folder.mkdir(parents=True, exist_ok=True)
        if config:
            shutil.copyfile(configs[component], out / config)
        data = {"file": file, "dtype": dtype, "tensors": lists[component]}
        raw = json.dumps(data, separators=(",", ":")).encode()
        with gzip.GzipFile(out / component / "tensors.json.gz", "wb", mtime=0) as f:   # reproducible bytes
            f.write(raw)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--release", type=Path, default=ROOT.parent / "shared" / "release",
                   help="the folder with state_dict_manifest.json, stepvideo-t2v/ and stepvideo-ti2v/")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    release, out = args.release, args.out
    manifest = json.loads((release / "state_dict_manifest.json").read_text())
    t2v = release / "stepvideo-t2v"
    configs = {c: t2v / spec[3] for c, spec in COMPONENTS.items() if spec[3]}
    lists = {c: tensors(manifest, spec[0]) for c, spec in COMPONENTS.items()}
    if out.exists():
        shutil.rmtree(out)
    write_release(out / "stepvideo-t2v", configs, lists)
    delta = json.loads((release / "stepvideo-ti2v" / "transformer_delta.json").read_text())
    ti2v_lists = dict(lists, transformer=apply_delta(lists["transformer"], delta))
    ti2v_configs = dict(configs, transformer=release / "stepvideo-ti2v" / "transformer" / "config.json")
    write_release(out / "stepvideo-ti2v", ti2v_configs, ti2v_lists)
    print(f"wrote {sum(f.stat().st_size for f in out.rglob('*') if f.is_file())} bytes under {out}")


if __name__ == "__main__":
    main()
