"""One loader per released network: config file -> module on meta -> memory-mapped weights, in eval mode."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointError, build_on_meta, load_weights, open_weights
from .config import ClipConfig, DiTConfig, StepLLMConfig, VAEConfig


def load_dit(folder: Path, dtype: torch.dtype = torch.bfloat16, device="cpu"):
    from .models.dit import StepVideoModel
    folder = Path(folder)
    cfg = DiTConfig.from_file(folder / "config.json")
    model = build_on_meta(lambda: StepVideoModel(cfg))
    load_weights(model, open_weights(folder, ("diffusion_pytorch_model", "model")), dtype)
    return model.to(device)


def load_step_llm(folder: Path, dtype: torch.dtype = torch.bfloat16, device="cpu"):
    from .models.step_llm import Step1Model
    folder = Path(folder)
    cfg = StepLLMConfig.from_file(folder / "config.json")
    model = build_on_meta(lambda: Step1Model(cfg))
    load_weights(model, open_weights(folder, ("model",)), dtype)
    return model.to(device)


def load_clip(folder: Path, dtype: torch.dtype = torch.float32, device="cpu"):
    """`folder` is the release's `hunyuan_clip` (holding `clip_text_encoder/`) or `clip_text_encoder` itself."""
    from .models.clip import BertModel
    folder = Path(folder)
    if (folder / "clip_text_encoder").is_dir():
        folder = folder / "clip_text_encoder"
    cfg = ClipConfig.from_file(folder / "config.json")
    source = open_weights(folder, ("model", "pytorch_model"))
    with_pooler = any(_strip_bert(k).startswith("pooler.") for k in source.keys())
    model = build_on_meta(lambda: BertModel(cfg, with_pooler=with_pooler))
    load_weights(model, source, dtype, rename=_strip_bert)
    return model.to(device)


def _strip_bert(key: str) -> str | None:
    key = key.removeprefix("bert.")
    return None if key.endswith("position_ids") else key  # old transformers saved this buffer


def load_vae(folder: Path, dtype: torch.dtype = torch.bfloat16, device="cpu"):
    """The decoder is required; the encoder is built only when the config says so and its weights exist."""
    from .models.vae import AutoencoderKL
    folder = Path(folder)
    cfg = VAEConfig.from_folder(folder)
    source = open_weights(folder, ("vae_v2", "vae", "model"))
    with_encoder = cfg.encoder.present and any(k.startswith("encoder.") for k in source.keys())
    model = build_on_meta(lambda: AutoencoderKL(cfg, with_encoder=with_encoder))
    rename = _vae_rename if with_encoder else lambda k: None if k.startswith("encoder.") else _vae_rename(k)
    load_weights(model, source, dtype, rename=rename)
    return model.to(device)


def _vae_rename(key: str) -> str:
    # the file stores decoder.conv_out.{weight,bias}; the module wraps that conv as conv_out.conv
    if key.startswith("decoder.conv_out.") and ".conv." not in key:
        return key.replace("decoder.conv_out.", "decoder.conv_out.conv.")
    return key


__all__ = ["CheckpointError", "load_dit", "load_step_llm", "load_clip", "load_vae"]
