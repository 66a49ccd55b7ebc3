"""A Step-Video model folder (release layout, or quantize.py's output), validated before any heavy work.

Opening a folder reads every config, every safetensors header and both tokenizers, and checks each component's
tensor names and shapes against its config, so a broken download fails in seconds with a one-line error.

A published release that is not on disk ("stepfun-ai/stepvideo-t2v") opens for planning only (`open_model_folder(
name, published=True)`): its configs and tensor shapes ship with the package (files/releases.py), its tokenizers
are length-only stand-ins, and reading a weight says to download it.

Before a generation (`check_weights`, called by the run's pre-flight, not by opening, so that --dry-run can plan the
zero-weight sparse releases of the benchmarks), a network whose weights are all zero, or a quantized one whose
scales are all zero, is refused: either gives a grey or empty video. It is a sample: the first 64 KiB of 8 weight
tensors (and of 8 scale tensors) spread over each network, milliseconds where reading a 29 GB DiT whole would take
minutes. A network zeroed as a whole (a zero-filled download or copy, a broken conversion) is always caught; one
zeroed only in part is not.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..files.weights import CheckpointError
from ..files.configs import ClipConfig, ConfigError, StepLLMConfig, read_json
from ..errors import StepVideoError
from .loaders import Component, open_clip, open_dit, open_step_llm, open_vae
from ..files.releases import published_release, shapes_source
from ..files.tokenizers import (length_only_tokenizer, load_clip_tokenizer, load_step_llm_tokenizer,
                                truncation_warnings)

DOWNLOAD_HINT = ("download it with: hf download stepfun-ai/stepvideo-t2v --local-dir {path} "
                 "(pip install huggingface_hub), or: modelscope download stepfun-ai/stepvideo-t2v --local-dir {path} "
                 "(pip install modelscope)")
# A missing folder named like quantize.py's output: the release is downloaded elsewhere, then quantized into it.
QUANTIZED_HINT = ("it is made by quantize.py from the release: download the release with hf download "
                  "stepfun-ai/stepvideo-t2v --local-dir {release} (pip install huggingface_hub; or modelscope "
                  "download ... with pip install modelscope), then: python quantize.py --model-dir {release} --out "
                  "{path} --format {fmt}")
SCALE_SUFFIX = ".scale"   # models/quant.py's name for the per-row scales of a quantized weight
TURBO_KEY = "lowvram_turbo"   # "true" | "false" in a quantized DiT's safetensors header
OPENERS = {"transformer": open_dit, "step_llm": open_step_llm, "hunyuan_clip": open_clip, "vae": open_vae}


class ModelFolderError(StepVideoError, ValueError):
    """The folder is missing, incomplete or not a Step-Video model; the message is one line with the fix."""


@dataclass(frozen=True)
class ModelFolder:
    root: Path
    weight_format: str          # "bf16" (release) or the quantized format of the DiT ("int8", "fp8")
    turbo: bool                 # the step-distilled checkpoint (see is_turbo)
    kind: str = "t2v"           # "t2v" (prompt to video) or "ti2v" (first image + prompt; see DiTConfig.kind)
    published: str | None = None   # a release not on disk, by hub name: `root` holds its packaged shapes

    def open(self, component: str, layers: int | None = None) -> Component:
        """A fresh Component (meta module + weight index) as a generation runs it: "vae" is the decoder alone,
        "vae_encoder" the encoder alone (TI2V's first image); loading it assigns memory-mapped tensors. `layers`
        (block stacks only: transformer, step_llm, hunyuan_clip) builds that many blocks, for the memory plan."""
        folder = "vae" if component == "vae_encoder" else component
        source = {"source": shapes_source(published_release(self.published), folder)} if self.published else {}
        if component == "vae":
            return open_vae(self.root / component, with_encoder=False, **source)
        if component == "vae_encoder":
            return open_vae(self.root / "vae", with_decoder=False, **source)
        if layers is None:
            return OPENERS[component](self.root / component, **source)
        return OPENERS[component](self.root / component, layers=layers, **source)

    def step_llm_tokenizer(self):
        if self.published:
            return length_only_tokenizer(StepLLMConfig.max_length)
        return load_step_llm_tokenizer(self.root / "step_llm")

    def clip_tokenizer(self):
        """At the release's 77 tokens whatever the tokenizer config says, like the reference (the DiT takes 77)."""
        if self.published:
            return length_only_tokenizer(ClipConfig.max_length)
        return load_clip_tokenizer(self.root / "hunyuan_clip", ClipConfig.max_length)

    def prompt_warnings(self, prompt: str, negative_prompt: str | None) -> list[str]:
        """Warnings for user texts longer than what the text encoders read (the tokens past it are dropped)."""
        if self.published:
            return []
        texts = {"prompt": prompt, **({"negative prompt": negative_prompt} if negative_prompt else {})}
        return truncation_warnings({"step_llm": self.step_llm_tokenizer(), "clip": self.clip_tokenizer()}, texts)

    def check_weights(self, components: tuple[str, ...] = tuple(OPENERS)) -> None:
        """Refuse (ModelFolderError, one line) a network whose weights or scales are all zero; see the module
        docstring."""
        try:
            for name in components:
                check_not_zero(name, self.open(name, layers=None if name == "vae" else 0).source)
        except (CheckpointError, OSError) as e:
            raise ModelFolderError(f"{e}") from None

    def files(self, component: str) -> list[Path]:
        return [f.path for f in self.open(component).source.files]

def open_model_folder(root: Path, published: bool = False) -> ModelFolder:
    """The folder at `root`, validated; with `published`, a release's hub name that is not a folder here opens
    from its packaged shapes (for planning: see the module docstring)."""
    release = published_release(str(root)) if not Path(root).expanduser().is_dir() else None
    if release is not None:
        if not published:
            raise ModelFolderError(f"{release.repo} is not downloaded: hf download {release.repo} --local-dir DIR "
                                   "and pass --model-dir DIR; --dry-run plans it as it is, from the shapes this "
                                   "package ships")
        return open_published(release)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ModelFolderError(f"model folder {root} not found; " + missing_folder_hint(root))
    missing = [c for c in OPENERS if not (root / c).is_dir()]
    if missing:
        raise ModelFolderError(f"{root} is not a Step-Video model folder (no {', '.join(missing)}/); "
                               "point --model-dir at the downloaded stepvideo-t2v folder")
    formats, headers = {}, {}
    try:
        for name, opener in OPENERS.items():
            component = opener(root / name)
            component.check()
            headers[name] = component.source.metadata
            formats[name] = headers[name].get("lowvram_quant_format", "bf16")
        load_step_llm_tokenizer(root / "step_llm")
        load_clip_tokenizer(root / "hunyuan_clip")
        turbo = is_turbo(root, headers["transformer"])
        kind = open_dit(root / "transformer", layers=0).config.kind
        if kind == "ti2v":
            open_vae(root / "vae", with_decoder=False).check()   # the first image is encoded: the encoder must load
    except (CheckpointError, ConfigError) as e:
        raise ModelFolderError(f"{e}") from None
    return ModelFolder(root, formats["transformer"], turbo, kind)


def missing_folder_hint(root: Path) -> str:
    """How to get the folder: download it, or, for a name like quantize.py's output (-int8, -fp8), download the
    release next to it and quantize it into this name."""
    fmt = next((f for f in ("int8", "fp8") if root.name.lower().endswith(f)), None)
    if fmt is None:
        return DOWNLOAD_HINT.format(path=root)
    stem = root.name[:-len(fmt)].rstrip("-_") or "stepvideo-t2v"
    return QUANTIZED_HINT.format(release=root.with_name(stem), path=root, fmt=fmt)


def check_not_zero(name: str, source) -> None:
    """Refuse a network whose sampled weights (or, quantized, scales) are all zero; see the module docstring."""
    keys = list(source.keys())
    scales = [k for k in keys if k.endswith(SCALE_SUFFIX)]
    weights = [k for k in keys if k not in scales and len(source.ref(k).shape) >= 2]
    for what, names in (("weights", weights), ("scales", scales)):
        zero = source.zero_sample(names)
        if zero:
            raise ModelFolderError(f"{name}: its {what} are all zero (sampled {len(zero)} tensors, e.g. {zero[0]}); "
                                   "the file is damaged or the conversion failed: re-download it"
                                   + (" or run quantize.py again" if what == "scales" else ""))


def is_turbo(root: Path, dit_header: dict | None = None) -> bool:
    """Is this the step-distilled turbo checkpoint? Its release files do not say (same configs, same layout, a
    model_index.json that names no repository), so, first that answers: what quantize.py recorded in the DiT's
    safetensors header (TURBO_KEY, from its source folder), model_index.json's `_name_or_path` (written by
    diffusers-style saves), then the folder's name. `--turbo` overrides all of them."""
    recorded = (dit_header or {}).get(TURBO_KEY)
    if recorded in ("true", "false"):
        return recorded == "true"
    index = root / "model_index.json"
    name = read_json(index).get("_name_or_path", "") if index.is_file() else ""
    return "turbo" in str(name).lower() or "turbo" in root.name.lower()


def open_published(release) -> ModelFolder:
    """A published release (files/releases.Release) from its packaged shapes, checked like a downloaded folder: a
    release whose tensors this version's networks do not match is refused here rather than planned wrong."""
    config = open_dit(release.root / "transformer", layers=0,
                      source=shapes_source(release, "transformer")).config
    folder = ModelFolder(release.root, "bf16", release.turbo, config.kind, published=release.repo)
    try:
        for name in OPENERS:
            folder.open(name).check()
    except (CheckpointError, ConfigError) as e:
        raise ModelFolderError(f"{release.repo}: this version's networks do not match its tensors yet "
                               f"({str(e).split(';')[0]})") from None
    return folder
