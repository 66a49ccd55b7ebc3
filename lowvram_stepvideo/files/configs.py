"""Architectures of the four released networks as frozen dataclasses, read from the release's config files.

Runtime choices (offload, tiling, precision) are not here: they live in profiles (see `profiles.py`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import ConfigError

# Fields that may be zero (every other integer of an architecture is a size or a count, so at least 1).
NON_NEGATIVE = {"pad_token_id", "down_sampling_layer", "temporal_up_layers"}


def read_json(path: Path) -> dict:
    """A JSON file that holds an object (a list, number or string at the top is refused)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object {{...}}, found a {type(raw).__name__}; "
                          "re-download this file")
    return raw


def checked_value(path: Path, key: str, value, kind: str, name: str = ""):
    """`value` as the field type `kind` ('int', 'float', 'bool', 'tuple[int, ...]'), or a one-line ConfigError:
    integers must be integers (not 2.0 or "2"), floats finite, sizes and epsilons positive."""
    name = name or key
    if kind.startswith("tuple"):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: {key} = {value!r} must be a list of integers")
        return tuple(checked_value(path, f"{key}[{i}]", v, "int", name) for i, v in enumerate(value))
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: {key} = {value!r} must be true or false")
        return value
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{path}: {key} = {value!r} must be an integer")
    if kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise ConfigError(f"{path}: {key} = {value!r} must be a finite number")
    if value < 0 or (value == 0 and name not in NON_NEGATIVE):
        raise ConfigError(f"{path}: {key} = {value!r} must be {'>= 0' if name in NON_NEGATIVE else 'positive'}")
    return float(value) if kind == "float" else value


def _field_kinds(cls) -> dict[str, str]:
    return {f.name: str(f.type) for f in fields(cls)}


def _pick(cls, raw: dict, path: Path, renames: dict[str, str]):
    """Build `cls` from the release's key names (`renames` maps release key -> field name), type-checked."""
    missing = [src for src in renames if src not in raw]
    if missing:
        raise ConfigError(f"{path}: missing keys for {cls.__name__}: {missing}")
    kinds = _field_kinds(cls)
    return cls(**{dst: checked_value(path, src, raw[src], kinds[dst], dst) for src, dst in renames.items()})


@dataclass(frozen=True)
class DiTConfig:
    num_layers: int = 48
    num_heads: int = 48
    head_dim: int = 128
    in_channels: int = 64
    out_channels: int = 64
    patch_size: int = 1
    caption_channels: tuple[int, int] = (6144, 1024)
    norm_eps: float = 1e-6          # final norm and caption norm
    block_norm_eps: float = 1e-5    # norm1/norm2 inside blocks (the release does not pass norm_eps to them)
    use_additional_conditions: bool = False   # true: Step-Video-TI2V (first image + motion score, §3.5)

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kind(self) -> str:
        """"ti2v" (image + prompt to video) or "t2v" (prompt to video)."""
        return "ti2v" if self.use_additional_conditions else "t2v"

    @property
    def patch_in_channels(self) -> int:
        """Channels the patch embedding takes: TI2V concatenates the condition latents to the noisy ones."""
        return 2 * self.in_channels if self.use_additional_conditions else self.in_channels

    @classmethod
    def from_file(cls, path: Path) -> "DiTConfig":
        raw = read_json(path)
        if raw.get("_class_name") != "StepVideoModel":
            raise ConfigError(f"{path}: not a Step-Video transformer config (_class_name={raw.get('_class_name')!r})")
        return _pick(cls, raw, path, {
            "num_layers": "num_layers", "num_attention_heads": "num_heads", "attention_head_dim": "head_dim",
            "in_channels": "in_channels", "out_channels": "out_channels", "patch_size": "patch_size",
            "caption_channels": "caption_channels", "norm_eps": "norm_eps",
            **({"use_additional_conditions": "use_additional_conditions"}
               if "use_additional_conditions" in raw else {})})   # absent: false, as the reference reads it


@dataclass(frozen=True)
class StepLLMConfig:
    hidden_size: int = 6144
    num_heads: int = 48
    num_groups: int = 8
    head_dim: int = 128
    num_layers: int = 48
    ffn_hidden_size: int = 16896
    vocab_size: int = 65536
    eps: float = 1e-5
    max_length: int = 320           # tokens per prompt, as the release's caption server uses

    @classmethod
    def from_file(cls, path: Path) -> "StepLLMConfig":
        raw = read_json(path)
        if "Step1Model" not in raw.get("architectures", []):
            raise ConfigError(f"{path}: not a step_llm config (architectures={raw.get('architectures')!r})")
        return _pick(cls, raw, path, {
            "hidden_size": "hidden_size", "num_attention_heads": "num_heads", "num_attention_groups": "num_groups",
            "kv_channels": "head_dim", "num_layers": "num_layers", "ffn_hidden_size": "ffn_hidden_size",
            "padded_vocab_size": "vocab_size", "layernorm_epsilon": "eps"})


@dataclass(frozen=True)
class ClipConfig:
    vocab_size: int = 47020
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    max_length: int = 77            # tokens per prompt (tokenizer model_max_length)

    @classmethod
    def from_file(cls, path: Path) -> "ClipConfig":
        raw = read_json(path)
        if "BertModel" not in raw.get("architectures", []) and raw.get("model_type") != "bert":
            raise ConfigError(f"{path}: not a BERT (hunyuan_clip) config")
        return _pick(cls, raw, path, {
            "vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
            "num_attention_heads": "num_heads", "intermediate_size": "intermediate_size",
            "max_position_embeddings": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
            "layer_norm_eps": "layer_norm_eps", "pad_token_id": "pad_token_id"})


@dataclass(frozen=True)
class VAEEncoderConfig:
    ch: int = 32
    ch_mult: tuple[int, ...] = (4, 8, 16, 16)
    down_sampling_layer: tuple[int, ...] = (1, 2)
    present: bool = True


@dataclass(frozen=True)
class VAEDecoderConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    temporal_up_layers: tuple[int, ...] = (2, 3)
    temporal_downsample: int = 4


@dataclass(frozen=True)
class VAEConfig:
    """The release ships no VAE config: defaults are the release's; a `config.json` in the VAE folder overrides."""
    z_channels: int = 64
    in_channels: int = 3
    out_channels: int = 3
    num_res_blocks: int = 2
    encoder: VAEEncoderConfig = field(default_factory=VAEEncoderConfig)
    decoder: VAEDecoderConfig = field(default_factory=VAEDecoderConfig)
    frame_len: int = 17             # frames per encoded chunk
    latent_len: int = 3             # latents per decoded chunk
    scale_factor: float = 1.0

    def frames_for_latents(self, k: int) -> int:
        """Frames one decoded chunk of k latents yields: (2k-1) after unpatchify, x2 per temporal up level, minus
        the temporal_downsample-1 dropped frames (release: 17 for k=3, 9 for k=2, 1 for k=1)."""
        d = self.decoder
        return (2 * k - 1) * 2 ** len(d.temporal_up_layers) - (d.temporal_downsample - 1)

    @classmethod
    def from_folder(cls, folder: Path) -> "VAEConfig":
        path = Path(folder) / "config.json"
        if not path.exists():
            return cls()
        raw = read_json(path)
        if "_class_name" in raw or "architectures" in raw:
            raise ConfigError(f"{path}: this is another network's config, not a VAE's; is this the vae/ folder?")
        if raw.get("version", 2) != 2:
            raise ConfigError(f"{path}: VAE version {raw['version']!r} is not supported; use the release's vae_v2")
        kw = _typed(cls, raw, path, "", skip={"encoder", "decoder"})
        kw["encoder"] = VAEEncoderConfig(**_typed(VAEEncoderConfig, raw.get("encoder", {}), path, "encoder."))
        kw["decoder"] = VAEDecoderConfig(**_typed(VAEDecoderConfig, raw.get("decoder", {}), path, "decoder."))
        config = cls(**kw)
        config._check(path)
        return config

    def _check(self, path: Path) -> None:
        enc, dec = self.encoder, self.decoder
        widths = [dec.ch * m for m in dec.ch_mult]
        if enc.present:
            widths += [enc.ch * m for m in (1, *enc.ch_mult)]
        if any(w % 32 for w in widths):
            raise ConfigError(f"{path}: VAE widths {widths} must be multiples of 32 (GroupNorm with 32 groups)")
        if self.frame_len != self.frames_for_latents(self.latent_len):
            raise ConfigError(f"{path}: frame_len {self.frame_len} does not match latent_len {self.latent_len} "
                              f"(a chunk of {self.latent_len} latents decodes to "
                              f"{self.frames_for_latents(self.latent_len)} frames)")


def _typed(cls, raw, path: Path, prefix: str, skip: set[str] = frozenset()) -> dict:
    """The keys of `raw` that are fields of `cls` (others are ignored), type-checked."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: not a VAE config ({prefix.rstrip('.')} must be a JSON object, found "
                          f"{type(raw).__name__})")
    kinds = _field_kinds(cls)
    return {k: checked_value(path, prefix + k, v, kinds[k], k) for k, v in raw.items() if k in kinds and k not in skip}
