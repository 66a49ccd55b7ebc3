"""Planning for what this machine does not have: a card (--card, --capability with --vram-gib, --list-cards) and a
published release that is not downloaded (--model-dir stepfun-ai/stepvideo-t2v, from the shapes the package ships)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli_support import run_cli
from conftest import RELEASE, manifest_shapes
from lowvram_stepvideo.engines.cards import CARDS
from lowvram_stepvideo.files.releases import SHAPES_DIR, published_release, shapes_source
from lowvram_stepvideo.loading.model_folder import ModelFolderError, open_model_folder

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a lighthouse at dusk (card tests)"
SMALL = ("--frames", "17", "--height", "272", "--width", "496")


@pytest.fixture(autouse=True)
def _demo(demo_env):
    yield


def dry_run_json(capsys, *argv) -> tuple[int, dict, str]:
    rc, out, err = run_cli(capsys, "--prompt", PROMPT, "--dry-run", "--json", *argv)
    return rc, (json.loads(out) if out.strip() else {}), err


def test_list_cards(capsys):
    rc, out, _ = run_cli(capsys, "--list-cards")
    assert rc == 0 and all(f"\n{c.name} " in out for c in CARDS)
    rc, out, _ = run_cli(capsys, "--list-cards", "--json")
    listed = json.loads(out)
    assert rc == 0 and [c["name"] for c in listed] == [c.name for c in CARDS]
    t4 = next(c for c in listed if c["name"] == "T4")
    assert t4["capability"] == "7.5" and t4["attention_kernels"] == ["sdpa"] and not t4["bf16_fused_attention"]


def test_card_t4_on_the_demo_plans_float16_attention(capsys):
    """T4 (sm75) has no fused bf16 attention: a bf16 run's attention runs on float16 copies (planned "math", its
    SDPA math kernel, before Turing ran float16 attention)."""
    rc, got, err = dry_run_json(capsys, "--demo", "--profile", "8gb", "--card", "T4")
    assert rc == 0, err
    assert got["card"] == "T4" and got["capability"] == "7.5" and got["attention_planned"] == "float16"
    assert got["budget_vram_from"].startswith("16.0 GiB T4")
    rc, ampere, err = dry_run_json(capsys, "--demo", "--profile", "8gb", "--card", "rtx 3060")
    assert rc == 0 and ampere["card"] == "RTX 3060" and ampere["attention_planned"] == "fused"


def test_card_text_report_names_the_kernel(capsys):
    rc, out, err = run_cli(capsys, "--demo", "--profile", "8gb", "--prompt", PROMPT, "--dry-run", "--card", "T4")
    assert rc == 0 and "card: T4 (compute capability 7.5) has no fused attention kernel for bfloat16" in out
    assert "attention runs on its float16 kernel" in out


def test_capability_with_vram(capsys):
    rc, got, err = dry_run_json(capsys, "--demo", "--profile", "8gb", "--capability", "7.5", "--vram-gib", "16")
    assert rc == 0, err
    assert got["card"] is None and got["capability"] == "7.5" and got["attention_planned"] == "float16"


@pytest.mark.parametrize("argv, message", [
    (["--card", "GTX 1080"], "--list-cards lists them"),
    (["--card", "T4", "--vram-gib", "12"], "drop --vram-gib"),
    (["--capability", "7.5"], "--capability goes with --vram-gib"),
    (["--capability", "sm75", "--vram-gib", "8"], "compute capability like 8.6"),
    (["--card", "T4", "--capability", "7.5"], "drop --capability"),
])
def test_card_options_refused_with_one_line(capsys, argv, message):
    rc, _, err = dry_run_json(capsys, "--demo", *argv)
    assert rc == 2 and err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_two_cards_plan_one_processs_share_with_the_ram_shared(capsys, monkeypatch):
    """--gpus 2 (a notebook's two T4s): rank 0's share of a CFG x2 run, the host RAM split between the two
    processes (each packs its own copy of the blocks it streams); under torchrun LOCAL_WORLD_SIZE says the same."""
    base = ("--demo", "--profile", "8gb", "--card", "T4", "--ram-gib", "32", *SMALL)
    rc, one, err = dry_run_json(capsys, *base)
    assert rc == 0, err
    rc, two, err = dry_run_json(capsys, *base, "--gpus", "2")
    assert rc == 0, err
    assert two["budget_host_from"] == one["budget_host_from"] + ", shared by 2 processes: 14.4 GiB each"
    assert two["budget_host_bytes"] == one["budget_host_bytes"] // 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    rc, launched, err = dry_run_json(capsys, *base)
    assert rc == 0 and launched["budget_host_bytes"] == two["budget_host_bytes"], err
    rc, _, err = dry_run_json(capsys, *base, "--gpus", "2")
    assert rc == 2 and "under torchrun drop it" in err


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "0"], "--gpus 0: give the number of cards, 1 to 64"),
    (["--gpus", "1", "--parallel", "cfg"], "--parallel cfg needs --gpus 2 or more"),
    (["--gpus", "3", "--parallel", "cfg"], "--parallel cfg needs exactly 2 processes"),
])
def test_gpus_refused_with_one_line(capsys, argv, message):
    rc, _, err = dry_run_json(capsys, "--demo", "--profile", "8gb", *argv)
    assert rc == 2 and err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


def test_card_needs_dry_run(capsys):
    rc, _, err = run_cli(capsys, "--demo", "--prompt", PROMPT, "--card", "T4")
    assert rc == 2 and "--card only goes with --dry-run" in err
    rc, _, err = run_cli(capsys, "--demo", "--prompt", PROMPT, "--gpus", "2")
    assert rc == 2 and "--gpus only goes with --dry-run" in err


def test_release_not_on_disk_is_planned_from_its_shapes(capsys):
    rc, got, err = dry_run_json(capsys, "--model-dir", "stepfun-ai/stepvideo-t2v", "--card", "RTX 4090",
                                "--ram-gib", "64", *SMALL)
    assert rc == 0 and got["fits"], err
    assert got["weight_format"] == "int8" and got["assumed_format"]         # the 24gb tier's format
    assert got["layout"]["dit"]["blocks"] == 48 and got["profile"] == "24gb"
    assert "planned from the shapes this package ships" in err


def test_image_to_video_release_not_on_disk_is_planned_with_its_image_phase(capsys):
    rc, got, err = dry_run_json(capsys, "--model-dir", "stepfun-ai/stepvideo-ti2v", "--card", "RTX 4090",
                                "--ram-gib", "64", *SMALL)
    assert rc == 0 and got["fits"], err
    assert "image" in got["phases"] and got["estimate_seconds"]["total"] > 0


def test_a_release_not_on_disk_does_not_run(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "--model-dir", "stepfun-ai/stepvideo-t2v", "--prompt", PROMPT,
                         "--output", tmp_path / "x.mp4")
    assert rc == 2 and "is not downloaded" in err and "--dry-run plans it" in err
    assert list(tmp_path.iterdir()) == []


def test_the_image_to_video_release_opens_as_ti2v_from_its_shapes():
    """The image-to-video release is planned as what it is (its DiT's extra tensors built), not as T2V."""
    folder = open_model_folder("stepfun-ai/stepvideo-ti2v", published=True)
    assert folder.kind == "ti2v" and folder.published == "stepfun-ai/stepvideo-ti2v"
    dit = folder.open("transformer", layers=1).module
    assert dit.pos_embed.proj.weight.shape[1] == 2 * dit.config.in_channels


def test_a_folder_on_disk_wins_over_the_release_name(tmp_path, monkeypatch):
    """A folder that happens to be called stepfun-ai/stepvideo-t2v is opened from disk, checked as usual."""
    (tmp_path / "stepfun-ai" / "stepvideo-t2v").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelFolderError, match="is not a Step-Video model folder"):
        open_model_folder(Path("stepfun-ai/stepvideo-t2v"), published=True)


@pytest.mark.parametrize("component, entry", [("transformer", "transformer"), ("step_llm", "step_llm"),
                                              ("hunyuan_clip", "hunyuan_clip"), ("vae", "vae_v2")])
def test_packaged_shapes_are_the_releases(component, entry):
    source = shapes_source(published_release("stepfun-ai/stepvideo-t2v"), component)
    assert {k: source.ref(k).shape for k in source.keys()} == manifest_shapes(entry)
    with pytest.raises(Exception, match="not downloaded"):
        source.tensor(next(iter(source.keys())))


def test_packaged_shapes_are_what_the_script_writes(tmp_path):
    """lowvram_stepvideo/release_shapes is scripts/make_release_shapes.py's output for the release data here."""
    if not (RELEASE / "stepvideo-ti2v" / "transformer_delta.json").is_file():
        pytest.skip("the release data (configs, manifest, TI2V delta) is not here")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_release_shapes.py"), "--release",
                           str(RELEASE), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    made = sorted(f.relative_to(tmp_path / "out") for f in (tmp_path / "out").rglob("*") if f.is_file())
    shipped = sorted(f.relative_to(SHAPES_DIR) for f in SHAPES_DIR.rglob("*") if f.is_file())
    assert made == shipped
    assert all((tmp_path / "out" / f).read_bytes() == (SHAPES_DIR / f).read_bytes() for f in made)


def test_auto_says_what_the_cards_capability_means():
    from lowvram_stepvideo.planning.budgets import auto_choice
    gib = 2**30
    profile, why = auto_choice(16 * gib, 64 * gib, (7, 5))
    assert profile.name == "16gb" and "compute capability 7.5 has no fused attention for bfloat16" in why
    assert "runs in float16 on its fused kernel" in why
    assert "math kernel" not in auto_choice(16 * gib, 64 * gib, (8, 6))[1]
    assert auto_choice(16 * gib, 64 * gib, (8, 6))[0] == profile       # the tier is still chosen by memory


@pytest.mark.slow
def test_the_readme_cards_table_is_current():
    """README.md's 'Will it run on my card?' table is what scripts/cards_readme.py writes from the card table."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "cards_readme.py"), "--check"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
