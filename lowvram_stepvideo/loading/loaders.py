"""One loader per released network: config file -> module on meta -> memory-mapped weights, in eval mode.

Each `open_*` function does the cheap part (read the config, build the module on the meta device, index the weight
files) and returns a `Component`; `load_*` then assigns the tensors. Validation and the memory plan use the
`open_*` half alone; the plan builds block stacks with `layers` blocks only (identical blocks allocate
identically), modules that cannot load the folder's weights but cost nothing to build.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..files.weights import CheckpointError, WeightSource, open_weights
from .assign import build_on_meta, load_weights, match_weights
from ..files.configs import ClipConfig, ConfigError, DiTConfig, StepLLMConfig, VAEConfig
from ..models.dit import StepVideoModel
from ..models.step_llm import Step1Model
from ..models.clip import BertModel
from ..models.vae import AutoencoderKL


@dataclass
class Component:
    module: nn.Module                       # on the meta device
    source: WeightSource
    rename: Callable[[str], str | None] = lambda k: k
    config: object = None                   # the architecture as released (all its blocks, whatever `module` has)

    def check(self) -> None:
        match_weights(self.module, self.source, self.rename)

    def load(self, dtype: torch.dtype, device="cpu", reader=None) -> nn.Module:
        model = load_weights(self.module, self.source, dtype, self.rename, reader)
        return model if torch.device(device).type == "cpu" else model.to(device)


def _read_config(read: Callable[[Path], object], folder: Path, component: str):
    """A component's config; errors also say which folder was expected (the usual cause is a wrong path)."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: folder not found; pass the {component} folder of a Step-Video model")
    try:
        return read(folder)
    except ConfigError as e:
        raise ConfigError(f"{e}; pass the {component} folder of a Step-Video model "
                          "(or re-download a missing file)") from None


def _layers(config, layers: int | None):
    """The config to build: the released one, or with its block stack cut to `layers` blocks."""
    return config if layers is None else replace(config, num_layers=min(layers, config.num_layers))


def open_dit(folder: Path, layers: int | None = None, source: WeightSource | None = None) -> Component:
    """`source`: the weights' index when they are not the folder's files (a release planned from its shapes)."""
    folder = Path(folder)
    config = _read_config(lambda f: DiTConfig.from_file(f / "config.json"), folder, "transformer/")
    source = source if source is not None else open_weights(folder, ("diffusion_pytorch_model", "model"))
    _check_dit_kind(folder, config, source)
    return Component(build_on_meta(lambda: StepVideoModel(_layers(config, layers))), source, config=config)


PATCH_WEIGHT = "pos_embed.proj.weight"
KIND_NAMES = {"t2v": "Step-Video-T2V", "ti2v": "Step-Video-TI2V"}


def _check_dit_kind(folder: Path, config: DiTConfig, source: WeightSource) -> None:
    """The config's kind (use_additional_conditions) must be the weights' (the patch embedding's input width):
    T2V takes the latent channels, TI2V twice that (latents and first-image condition)."""
    if PATCH_WEIGHT not in source.keys() or len(source.ref(PATCH_WEIGHT).shape) != 4:
        return   # the strict match names what is missing or malformed
    width = source.ref(PATCH_WEIGHT).shape[1]
    kinds = {config.in_channels: "t2v", 2 * config.in_channels: "ti2v"}
    if width in kinds and kinds[width] != config.kind:
        flag = str(config.use_additional_conditions).lower()
        raise CheckpointError(f"{folder}: the weights are {KIND_NAMES[kinds[width]]}'s ({PATCH_WEIGHT} takes {width} "
                              f"channels) but config.json says use_additional_conditions {flag} "
                              f"({KIND_NAMES[config.kind]}); use the config.json that came with these weights")


def open_step_llm(folder: Path, layers: int | None = None, source: WeightSource | None = None) -> Component:
    folder = Path(folder)
    config = _read_config(lambda f: StepLLMConfig.from_file(f / "config.json"), folder, "step_llm/")
    source = source if source is not None else open_weights(folder, ("model",))
    return Component(build_on_meta(lambda: Step1Model(_layers(config, layers))), source, config=config)


def open_clip(folder: Path, layers: int | None = None, source: WeightSource | None = None) -> Component:
    """`folder` is the release's `hunyuan_clip` (holding `clip_text_encoder/`) or `clip_text_encoder` itself."""
    folder = Path(folder)
    if (folder / "clip_text_encoder").is_dir():
        folder = folder / "clip_text_encoder"
    config = _read_config(lambda f: ClipConfig.from_file(f / "config.json"), folder, "hunyuan_clip/")
    source = source if source is not None else open_weights(folder, ("model", "pytorch_model"))
    with_pooler = any((_strip_bert(k) or "").startswith("pooler.") for k in source.keys())
    module = build_on_meta(lambda: BertModel(_layers(config, layers), with_pooler=with_pooler))
    return Component(module, source, _strip_bert, config)


def _strip_bert(key: str) -> str | None:
    key = key.removeprefix("bert.")
    return None if key.endswith("position_ids") else key  # old transformers saved this buffer


def open_vae(folder: Path, with_encoder: bool = True, with_decoder: bool = True,
             source: WeightSource | None = None) -> Component:
    """The decoder is required; the encoder is built only when asked, the config says so and its weights exist
    (T2V generation only decodes: it opens the VAE without the encoder, whose 110 M parameters never load).
    Without `with_decoder`: the encoder alone (TI2V's first-image encode), which the folder must have."""
    folder = Path(folder)
    config = _read_config(VAEConfig.from_folder, folder, "vae/")
    source = source if source is not None else open_weights(folder, ("vae_v2", "vae", "model"))
    has_encoder = config.encoder.present and any(k.startswith("encoder.") for k in source.keys())
    if not with_decoder and not has_encoder:
        raise CheckpointError(f"{folder}: no VAE encoder weights (encoder.*), which Step-Video-TI2V needs to encode "
                              "the first image; use the release's vae/vae_v2.safetensors (it has them)")
    with_encoder = with_encoder and has_encoder
    rename = _vae_renamer(with_encoder, with_decoder)
    return Component(build_on_meta(lambda: AutoencoderKL(config, with_encoder, with_decoder)), source, rename, config)


def _vae_renamer(encoder: bool, decoder: bool) -> Callable[[str], str | None]:
    def rename(key: str) -> str | None:
        if (key.startswith("encoder.") and not encoder) or (key.startswith("decoder.") and not decoder):
            return None
        return _vae_rename(key)
    return rename


def _vae_rename(key: str) -> str:
    # the file stores decoder.conv_out.{weight,bias}; the module wraps that conv as conv_out.conv
    if key.startswith("decoder.conv_out.") and ".conv." not in key:
        return key.replace("decoder.conv_out.", "decoder.conv_out.conv.")
    return key


def load_dit(folder: Path, dtype: torch.dtype = torch.bfloat16, device="cpu") -> nn.Module:
    return open_dit(folder).load(dtype, device)


def load_step_llm(folder: Path, dtype: torch.dtype = torch.bfloat16, device="cpu") -> nn.Module:
    return open_step_llm(folder).load(dtype, device)


def load_clip(folder: Path, dtype: torch.dtype = torch.float32, device="cpu") -> nn.Module:
    return open_clip(folder).load(dtype, device)


def load_vae(folder: Path, dtype: torch.dtype = torch.bfloat16, device="cpu") -> nn.Module:
    return open_vae(folder).load(dtype, device)


__all__ = ["CheckpointError", "Component", "open_dit", "open_step_llm", "open_clip", "open_vae",
           "load_dit", "load_step_llm", "load_clip", "load_vae"]
