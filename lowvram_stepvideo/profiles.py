"""Runtime profiles: one TOML file per memory tier (`profiles/*.toml` at the repository root), read into frozen
dataclasses. A profile holds runtime choices only (where weights live, how work is chunked); the networks'
architecture is in `files/configs.py`.

Keys (every file has exactly these; the TOML comments say why each tier picks its values):

    description        one line shown by --list-profiles
    device             "cuda" | "cpu"
    min_vram_gib       auto pick: the largest cuda tier whose value is <= the card's total memory (GiB)
    compute_dtype      "bfloat16" | "float16" | "float32"
    weight_format      "bf16" | "int8" | "fp8": what the DiT and step_llm weights of the folder this tier is sized
                       for are stored in (the release is bf16; quantize.py writes int8/fp8)
    attention          "sdpa" | "flash" | "sage" | "auto" (best importable for the card: engines/attention.py)
    matmul             "weight-only" (int8/fp8 weights expanded to compute_dtype: exact) | "fast" (int8 x int8 /
                       fp8 x fp8 tensor-core matmuls with per-token activation scales on cards that have them,
                       weight-only elsewhere; see engines/fast_matmul.py)
    cfg_mode           "batch" (cond+uncond as a batch of 2) | "sequential" (two passes)
    token_chunk   FFN (and other token-wise ops) run over at most this many tokens at once; 0 = no chunking
    attention_head_chunk  DiT attention runs this many heads at a time (each group projects only its rows of the
                       fused q/k/v weights); 0 = all heads at once
    presets            ladder of {frames, height, width, steps}, largest first: the first is the default, a
                       run steps down on OOM. frames % 17 == 0, height and width % 16 == 0.
    [memory]           host_ram_gb: host RAM (GiB) the tier is sized for (auto pick: cpu tiers are chosen by it, a
                       cuda tier above the machine's RAM budget is scaled down to it); packed_gb: part of it for
                       packed block copies of source "ram" stacks (page-locked on cuda, ordinary RAM on cpu;
                       lowered at run time to the available RAM minus engines.streaming.PACKED_RAM_MARGIN)
    [dit]              streaming of the DiT's 48 blocks: resident_blocks kept on the compute device (an upper
                       bound, the memory plan may lower it); prefetch = blocks copied ahead on a side stream
                       (0 = synchronous); source of the others each forward: "ram" (a packed copy held in RAM,
                       within packed_gb, page-locked on cuda; beyond it read from the checkpoint's page cache) |
                       "disk" (read from the checkpoint files, nothing held, packed_gb ignored)
    [text_encoders]    placement: "device" (step_llm whole on the compute device for the text phase) |
                       "stream" (its blocks streamed with the settings below); CLIP (1.3 GB) is always whole.
                       resident_blocks, prefetch, source as for [dit]
    [vae]              tile: spatial tile size in latent pixels (x16 image pixels), 0 = untiled;
                       overlap: latent pixels shared by neighbouring tiles (blended)

Where the files live: the repository's `profiles/` folder is the single copy, the one to edit or copy. A checkout
and `pip install -e .` read it next to the package (`<repo>/lowvram_stepvideo/../profiles`); a wheel (`pip install
.`) carries a copy of it as `lowvram_stepvideo/profile_files/` (setup.cfg maps the folder there), read from any
working directory. LOWVRAM_STEPVIDEO_PROFILES points elsewhere, and --profile also takes a path to any .toml file.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from .errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # python < 3.11
    import tomli as tomllib

PACKAGED_PROFILES_DIR = Path(__file__).resolve().parent / "profile_files"   # installed from a wheel
REPO_PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"      # a checkout or an editable install
ENV_DIR = "LOWVRAM_STEPVIDEO_PROFILES"
GiB = 2**30


@dataclass(frozen=True)
class Preset:
    frames: int
    height: int
    width: int
    steps: int

    @property
    def tokens(self) -> int:
        """DiT sequence length: 3 latents per 17 frames, 16x spatial compression (patch size 1)."""
        return max(self.frames // 17 * 3, 1) * (self.height // 16) * (self.width // 16)

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @classmethod
    def parse(cls, text: str, steps: int) -> "Preset":
        """'204x544x992' (frames x height x width) -> Preset; raises ValueError with the expected form."""
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*", text)
        if not m:
            raise ValueError(f"preset {text!r}: expected FRAMESxHEIGHTxWIDTH, e.g. 204x544x992")
        preset = cls(int(m[1]), int(m[2]), int(m[3]), steps)
        problem = _preset_problem(preset)
        if problem:
            raise ValueError(f"preset {text!r}: {problem}")
        return preset


@dataclass(frozen=True)
class Memory:
    host_ram_gb: float
    packed_gb: float


@dataclass(frozen=True)
class Streaming:
    resident_blocks: int
    prefetch: int
    source: str


@dataclass(frozen=True)
class TextEncoders:
    placement: str
    resident_blocks: int
    prefetch: int
    source: str


@dataclass(frozen=True)
class VAETiling:
    tile: int
    overlap: int


@dataclass(frozen=True)
class Profile:
    name: str
    path: Path
    description: str
    device: str
    min_vram_gib: float
    compute_dtype: str
    weight_format: str
    attention: str
    matmul: str
    cfg_mode: str
    token_chunk: int
    attention_head_chunk: int
    presets: tuple[Preset, ...]
    memory: Memory
    dit: Streaming
    text_encoders: TextEncoders
    vae: VAETiling

    @property
    def torch_dtype(self):
        import torch
        return getattr(torch, self.compute_dtype)

    @property
    def default_preset(self) -> Preset:
        return self.presets[0]


SECTIONS = {"memory": Memory, "dit": Streaming, "text_encoders": TextEncoders, "vae": VAETiling}
NOT_IN_FILE = {"name", "path"}


# ---- value rules: each returns a problem description or None ------------------------------------------------

def _choice(*allowed):
    return lambda v: None if v in allowed else f"must be one of {', '.join(map(repr, allowed))}"


def _int(lo: int = 0):
    def rule(v):
        if isinstance(v, bool) or not isinstance(v, int):
            return "must be an integer"
        return None if v >= lo else f"must be >= {lo}"
    return rule


def _number(lo: float = 0.0):
    def rule(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return "must be a number"
        return None if v >= lo else f"must be >= {lo}"
    return rule


def _text(v):
    return None if isinstance(v, str) and v.strip() else "must be a non-empty string"


SOURCE = _choice("ram", "disk")
RULES = {
    "description": _text,
    "device": _choice("cuda", "cpu"),
    "min_vram_gib": _number(),
    "compute_dtype": _choice("bfloat16", "float16", "float32"),
    "weight_format": _choice("bf16", "int8", "fp8"),
    "attention": _choice("sdpa", "flash", "sage", "auto"),
    "matmul": _choice("weight-only", "fast"),
    "cfg_mode": _choice("batch", "sequential"),
    "token_chunk": _int(),
    "attention_head_chunk": _int(),
    "memory.host_ram_gb": _number(),
    "memory.packed_gb": _number(),
    "dit.resident_blocks": _int(),
    "dit.prefetch": _int(),
    "dit.source": SOURCE,
    "text_encoders.placement": _choice("device", "stream"),
    "text_encoders.resident_blocks": _int(),
    "text_encoders.prefetch": _int(),
    "text_encoders.source": SOURCE,
    "vae.tile": _int(),
    "vae.overlap": _int(),
}
PRESET_KEYS = [f.name for f in fields(Preset)]


def _preset_problem(p: Preset) -> str | None:
    if p.frames <= 0 or p.frames % 17:
        return f"frames = {p.frames} must be a positive multiple of 17 (17 frames = 3 latents)"
    for name in ("height", "width"):
        if getattr(p, name) <= 0 or getattr(p, name) % 16:
            return f"{name} = {getattr(p, name)} must be a positive multiple of 16"
    if p.steps <= 0:
        return f"steps = {p.steps} must be >= 1"
    return None


# ---- reading -------------------------------------------------------------------------------------------------

def _check_keys(raw: dict, expected: list[str], where: str, path: Path) -> None:
    unknown = [k for k in raw if k not in expected]
    if unknown:
        raise ConfigError(f"{path}: unknown key '{where}{unknown[0]}' (expected: {', '.join(expected)})")
    missing = [k for k in expected if k not in raw]
    if missing:
        raise ConfigError(f"{path}: missing key '{where}{missing[0]}'")


def _checked(raw: dict, key: str, path: Path):
    value = raw[key.rsplit(".", 1)[-1]]
    problem = RULES[key](value)
    if problem:
        raise ConfigError(f"{path}: {key} = {value!r} {problem}")
    return value


def _section(cls, raw, name: str, path: Path):
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: [{name}] must be a table")
    _check_keys(raw, [f.name for f in fields(cls)], f"{name}.", path)
    return cls(**{f.name: _checked(raw, f"{name}.{f.name}", path) for f in fields(cls)})


def _presets(raw, path: Path) -> tuple[Preset, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{path}: presets must be a non-empty list of {{frames, height, width, steps}}")
    out = []
    for i, item in enumerate(raw):
        where = f"presets[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{path}: {where} must be a table {{frames, height, width, steps}}")
        _check_keys(item, PRESET_KEYS, f"{where}.", path)
        bad = [k for k in PRESET_KEYS if isinstance(item[k], bool) or not isinstance(item[k], int)]
        if bad:
            raise ConfigError(f"{path}: {where}.{bad[0]} = {item[bad[0]]!r} must be an integer")
        out.append(Preset(**item))
    return tuple(out)


def profile_from_dict(raw: dict, name: str, path: Path) -> Profile:
    top = [f.name for f in fields(Profile) if f.name not in NOT_IN_FILE]
    _check_keys(raw, top, "", path)
    kw = {k: _checked(raw, k, path) for k in RULES if "." not in k}
    kw.update({sec: _section(cls, raw[sec], sec, path) for sec, cls in SECTIONS.items()})
    profile = Profile(name=name, path=Path(path), presets=_presets(raw["presets"], path), **kw)
    validate(profile)
    return profile


def validate(p: Profile) -> Profile:
    """Checks that involve several keys; raises ConfigError naming the file and key."""
    def fail(msg: str):
        raise ConfigError(f"{p.path}: {msg}")
    for i, preset in enumerate(p.presets):
        if _preset_problem(preset):
            fail(f"presets[{i}]: {_preset_problem(preset)}")
        if i and preset.tokens > p.presets[i - 1].tokens:
            fail(f"presets[{i}] = {preset} is larger than presets[{i - 1}]; list presets largest first")
    if p.memory.packed_gb > p.memory.host_ram_gb:
        fail(f"memory.packed_gb = {p.memory.packed_gb} exceeds memory.host_ram_gb = {p.memory.host_ram_gb}")
    if p.vae.tile and p.vae.tile <= 2 * p.vae.overlap:
        fail(f"vae.tile = {p.vae.tile} must exceed twice vae.overlap = {p.vae.overlap} (or be 0 = untiled)")
    if p.device == "cuda" and p.min_vram_gib <= 0:
        fail("min_vram_gib must be > 0 for a cuda profile")
    if p.device == "cpu" and p.attention in ("flash", "sage"):
        fail(f"attention = {p.attention!r} needs CUDA; use 'sdpa' or 'auto' on cpu")
    return p


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read profile ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def profiles_dir() -> Path:
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    return PACKAGED_PROFILES_DIR if PACKAGED_PROFILES_DIR.is_dir() else REPO_PROFILES_DIR


def list_profiles() -> list[str]:
    """Names of the profiles in the profiles folder: cpu tiers first, then GPU tiers by size."""
    folder = profiles_dir()
    names = [p.stem for p in folder.glob("*.toml")] if folder.is_dir() else []
    return sorted(names, key=lambda n: (n[:1].isdigit(), int(re.match(r"\d*", n)[0] or 0), n))


def _resolve(name_or_path: str | os.PathLike) -> Path:
    text = str(name_or_path)
    if text.endswith(".toml") or os.sep in text or (os.altsep and os.altsep in text):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(f"{path}: profile file not found")
        return path
    path = profiles_dir() / f"{text}.toml"
    if not path.is_file():
        available = ", ".join(list_profiles()) or f"none (no .toml files in {profiles_dir()})"
        raise ConfigError(f"unknown profile {text!r}; available: {available} (or pass a path to a .toml file)")
    return path


def load_profile(name_or_path: str | os.PathLike) -> Profile:
    """A profile by name ('24gb', from the profiles folder) or by path to a .toml file."""
    path = _resolve(name_or_path)
    return profile_from_dict(_read_toml(path), path.stem, path)


def with_overrides(profile: Profile, **overrides) -> Profile:
    """A copy with CLI overrides applied. Keys are top-level names (`attention`, `cfg_mode`, ...) or
    `<section>_<key>` (`dit_resident_blocks`, `vae_tile`, `memory_packed_gb`, ...); None means "not given".
    `presets` takes a sequence of Preset. Values are validated like the file's."""
    top, nested = {}, {sec: {} for sec in SECTIONS}
    for key, value in overrides.items():
        if value is None:
            continue
        sec = next((s for s in SECTIONS if key.startswith(s + "_") and key[len(s) + 1:] in _names(s)), None)
        dotted = f"{sec}.{key[len(sec) + 1:]}" if sec else key
        if sec is None and key not in RULES and key != "presets":
            raise ValueError(f"unknown profile override {key!r}; known: {', '.join(override_names())}")
        if key != "presets":
            problem = RULES[dotted](value)
            if problem:
                raise ValueError(f"override {key} = {value!r} {problem}")
        if sec:
            nested[sec][dotted.split(".", 1)[1]] = value
        else:
            top[key] = tuple(value) if key == "presets" else value
    if "presets" in top and not top["presets"]:
        raise ValueError("override presets: needs at least one preset")
    sections = {sec: replace(getattr(profile, sec), **kw) for sec, kw in nested.items() if kw}
    updated = replace(profile, **top, **sections)
    try:
        return validate(updated)
    except ConfigError as e:
        raise ValueError(f"after overrides: {str(e).split(': ', 1)[1]}") from None


def _names(section: str) -> list[str]:
    return [f.name for f in fields(SECTIONS[section])]


def override_names() -> list[str]:
    names = [k for k in RULES if "." not in k and k != "description"] + ["presets"]
    return names + [f"{s}_{n}" for s in SECTIONS for n in _names(s)]


def detect_vram_bytes() -> int | None:
    """Total memory of CUDA device 0, or None without CUDA."""
    import torch
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory


def describe(profile: Profile) -> dict:
    """Plain-data view (for metadata sidecars and --dry-run reports)."""
    out = asdict(profile)
    out["path"] = str(profile.path)
    out["presets"] = [str(p) + f"@{p.steps}" for p in profile.presets]
    return out


def ladder_from(presets: tuple[Preset, ...], first: Preset) -> list[Preset]:
    """`first`, then every preset of the profile that is smaller, with `first`'s number of steps (memory does not
    depend on it, and a fallback should not silently change the quality asked for)."""
    return [first] + [replace(p, steps=first.steps) for p in presets if p.tokens < first.tokens]
