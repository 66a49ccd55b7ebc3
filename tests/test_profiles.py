"""Profiles: every shipped TOML loads with the same keys, tiers are ordered sensibly, bad files fail in one line."""
import json
from pathlib import Path

import pytest

from lowvram_stepvideo import profiles as P
from lowvram_stepvideo.planning import budgets
from lowvram_stepvideo.files.configs import ConfigError

try:
    import tomllib
except ModuleNotFoundError:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["cpu", "cpu-lowram", "8gb", "12gb", "16gb", "24gb", "48gb", "80gb"]
GPU_TIERS = ["8gb", "12gb", "16gb", "24gb", "48gb", "80gb"]


def key_paths(raw: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in raw.items():
        if isinstance(v, dict):
            out |= key_paths(v, f"{prefix}{k}.")
        elif isinstance(v, list) and v and all(isinstance(i, dict) for i in v):
            out |= {f"{prefix}{k}[]." + s for item in v for s in key_paths(item)}
        else:
            out.add(prefix + k)
    return out


def test_shipped_profiles_are_listed():
    assert P.profiles_dir() == ROOT / "profiles"
    assert P.list_profiles() == SHIPPED


def test_every_file_has_identical_keys():
    keys = {n: key_paths(tomllib.loads((ROOT / "profiles" / f"{n}.toml").read_text())) for n in SHIPPED}
    reference = keys["24gb"]
    assert len(reference) > 20
    for name, k in keys.items():
        assert k == reference, f"{name}: {sorted(k ^ reference)}"


@pytest.mark.parametrize("name", SHIPPED)
def test_profile_loads(name):
    p = P.load_profile(name)
    assert p.name == name and p.path == ROOT / "profiles" / f"{name}.toml"
    assert str(p.default_preset) == "204x544x992"          # ladder starts at the release default
    assert [q.tokens for q in p.presets] == sorted((q.tokens for q in p.presets), reverse=True)
    assert p.default_preset.tokens == 36 * 34 * 62          # STEPVIDEO.md §5 table
    assert p.compute_dtype == ("float32" if p.device == "cpu" else "bfloat16")
    assert P.load_profile(p.path) == p                      # by path gives the same profile


def test_tiers_are_ordered():
    tiers = [P.load_profile(n) for n in GPU_TIERS]
    assert [t.min_vram_gib for t in tiers] == sorted(t.min_vram_gib for t in tiers)
    tiles = [t.vae.tile or 10**9 for t in tiers]           # 0 = untiled = the largest "tile"
    assert tiles == sorted(tiles)
    assert [t.dit.resident_blocks for t in tiers] == sorted(t.dit.resident_blocks for t in tiers)
    small, big = tiers[0], tiers[-1]
    assert small.vae.tile > 0 and small.token_chunk > 0 and small.cfg_mode == "sequential"
    assert big.dit.resident_blocks >= 36 and big.vae.tile == 0 and big.cfg_mode == "batch"
    assert big.text_encoders.placement == "device"


def test_cpu_lowram_holds_nothing():
    p = P.load_profile("cpu-lowram")
    assert p.device == "cpu" and p.memory.packed_gb == 0
    assert (p.dit.resident_blocks, p.dit.source) == (0, "disk")
    assert (p.text_encoders.placement, p.text_encoders.resident_blocks, p.text_encoders.source) == \
        ("stream", 0, "disk")


def test_unknown_name_lists_available():
    with pytest.raises(ConfigError) as e:
        P.load_profile("20gb")
    msg = str(e.value)
    assert "\n" not in msg and "'20gb'" in msg and all(n in msg for n in SHIPPED)


def test_missing_file_path():
    with pytest.raises(ConfigError, match="not found"):
        P.load_profile("/nonexistent/x.toml")


BASE = (ROOT / "profiles" / "24gb.toml").read_text()
BAD = {
    "unknown top-level key": (BASE.replace('cfg_mode = "sequential"', 'cfg_mode = "sequential"\ncfgg = 1'), "'cfgg'"),
    "unknown section key": (BASE.replace("prefetch = 2\nsource = \"ram\"",
                                         "prefetch = 2\nsource = \"ram\"\nresident = 3"), "'dit.resident'"),
    "missing key": (BASE.replace("overlap = 4", ""), "'vae.overlap'"),
    "missing section": (BASE.replace("[memory]", "[memoryx]"), "'memoryx'"),
    "bad choice": (BASE.replace('attention = "auto"', 'attention = "xformers"'), "attention = 'xformers'"),
    "bool for int": (BASE.replace("resident_blocks = 12", "resident_blocks = true"), "dit.resident_blocks"),
    "negative": (BASE.replace("token_chunk = 16384", "token_chunk = -1"), "token_chunk"),
    "frames not x17": (BASE.replace("frames = 136,", "frames = 130,"), "presets[1]"),
    "height not x16": (BASE.replace("height = 384,", "height = 380,"), "presets[7]"),
    "preset key": (BASE.replace("steps = 50 },   # release", "step = 50 },   # release"), "presets[0]"),
    "ladder order": (BASE.replace("frames = 68,", "frames = 170,"), "presets[3]"),
    "pinned > host": (BASE.replace("packed_gb = 32", "packed_gb = 64"), "memory.packed_gb"),
    "tile vs overlap": (BASE.replace("tile = 32", "tile = 8"), "vae.tile"),
    "syntax": (BASE.replace('device = "cuda"', "device = cuda"), "not valid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_file_is_one_line_error(tmp_path, case):
    text, expected = BAD[case]
    path = tmp_path / "broken.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        P.load_profile(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and expected in msg, msg


def test_profiles_dir_from_environment(tmp_path, monkeypatch):
    (tmp_path / "mine.toml").write_text(BASE)
    monkeypatch.setenv(P.ENV_DIR, str(tmp_path))
    assert P.list_profiles() == ["mine"]
    assert P.load_profile("mine").dit == P.load_profile(ROOT / "profiles" / "24gb.toml").dit


def test_overrides():
    base = P.load_profile("24gb")
    p = P.with_overrides(base, attention="sdpa", cfg_mode="batch", dit_resident_blocks=0, vae_tile=0,
                         text_encoders_source="ram", memory_host_ram_gb=100, token_chunk=None)
    assert (p.attention, p.cfg_mode, p.dit.resident_blocks, p.vae.tile) == ("sdpa", "batch", 0, 0)
    assert p.text_encoders.source == "ram" and p.memory.host_ram_gb == 100
    assert p.token_chunk == base.token_chunk                   # None = flag not given
    assert (p.dit.prefetch, p.vae.overlap) == (base.dit.prefetch, base.vae.overlap)
    assert base.attention == "auto"                                       # the original is untouched
    small = P.Preset.parse("51x384x672", steps=20)
    assert P.with_overrides(base, presets=[small]).presets == (small,)
    assert P.with_overrides(base) == base
    plain = json.loads(json.dumps(P.describe(p)))                         # sidecar-ready
    assert plain["dit"]["resident_blocks"] == 0 and plain["presets"][0] == "204x544x992@50"


@pytest.mark.parametrize("kw, expected", [
    (dict(atention="sdpa"), "unknown profile override 'atention'"),
    (dict(dit_foo=1), "unknown profile override 'dit_foo'"),
    (dict(cfg_mode="both"), "override cfg_mode = 'both'"),
    (dict(dit_prefetch=-2), "override dit_prefetch"),
    (dict(vae_tile=4), "vae.tile"),                                       # 4 <= 2 * overlap 4
    (dict(memory_packed_gb=1000), "memory.packed_gb"),
    (dict(device="cpu", attention="flash"), "needs CUDA"),
    (dict(presets=[]), "at least one preset"),
])
def test_bad_overrides(kw, expected):
    with pytest.raises(ValueError) as e:
        P.with_overrides(P.load_profile("24gb"), **kw)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_preset_parse():
    p = P.Preset.parse(" 68x544x992 ", steps=30)
    assert (p.frames, p.height, p.width, p.steps, str(p)) == (68, 544, 992, 30, "68x544x992")
    assert p.tokens == 12 * 34 * 62
    for bad in ["68x544", "60x544x992", "68x540x992", "abc"]:
        with pytest.raises(ValueError):
            P.Preset.parse(bad, steps=30)


GiB = 2**30


@pytest.mark.parametrize("vram, expected", [
    (None, "cpu"),
    (12_622_168_064, "12gb"),      # RTX 3060 12 GB as torch reports it
    (17_171_480_576, "16gb"),      # RTX 4080
    (int(20 * GiB), "16gb"),       # between tiers: the largest that fits
    (25_757_220_864, "24gb"),      # RTX 4090
    (int(31.4 * GiB), "24gb"),     # RTX 5090
    (int(44.4 * GiB), "48gb"),     # L40S
    (51_050_840_064, "48gb"),      # RTX A6000
    (85_045_231_616, "80gb"),      # H100 80 GB
    (int(139 * GiB), "80gb"),      # H200
    (int(8 * GiB), "8gb"),         # RTX 3070 8 GB
    (int(6 * GiB), "8gb"),         # below every tier: the smallest
])
def test_auto_profile(vram, expected):
    assert budgets.auto_profile(vram, 128 * GiB).name == expected     # RAM for every tier (auto by RAM: test_fit.py)
