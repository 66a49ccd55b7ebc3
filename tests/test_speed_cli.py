"""generate.py with the speed levers on the demo model: the choice printed once, recorded in the sidecar, the step
cache's counts, bad values refused in one line."""
import pytest

from cli_support import read_sidecar, run_cli

PROMPT = "a red fox runs through fresh snow"
SMALL = ["--frames", "17", "--height", "16", "--width", "16"]
pytestmark = pytest.mark.usefixtures("demo_env", "one_torch_thread")


def test_levers_are_said_once_and_recorded_in_the_sidecar(tmp_path, capsys):
    out = tmp_path / "fox.mp4"
    rc, _, err = run_cli(capsys, "--demo", "--prompt", PROMPT, *SMALL, "--steps", "5", "--step-cache", "0.9",
                         "--matmul", "fast", "--no-text-cache", "--output", out)
    assert rc == 0, err
    said = [line for line in err.splitlines() if line.startswith("speed: ")]
    assert len(said) == 1 and "attention sdpa" in said[0] and "step cache 0.9" in said[0]
    speed = read_sidecar(out)["speed"]
    assert speed["attention"] == "sdpa" and speed["matmul"] == "weight-only"
    assert "int8 or fp8 folder" in speed["matmul_reason"]        # the demo folder holds float weights
    assert speed["options"] == {"cache": 0.9, "cache_max_reuse": 2, "compile": False}
    counts = speed["step_cache"]
    assert counts["full"] + counts["cached"] == 2 * 5 and counts["cached"] > 0   # sequential CFG: 2 per step
    assert set(counts["branches"]) == {"cond", "uncond"}
    assert f"step cache: {counts['full']} full and {counts['cached']} cached" in err


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_bad_cache_threshold_is_one_line(tmp_path, capsys, value):
    rc, out, err = run_cli(capsys, "--demo", "--prompt", PROMPT, "--step-cache", value, "--output",
                           tmp_path / "x.mp4")
    assert rc == 2 and out == "" and len(err.splitlines()) == 1 and "--step-cache" in err and "[0, 1)" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_plan_counts_the_step_cache_residuals(demo_dir):
    """(Two plans of the demo: ~1 min on a busy machine until the planner gets faster.)"""
    from lowvram_stepvideo.defaults import DEMO_PRESET
    from lowvram_stepvideo.loading.model_folder import open_model_folder
    from lowvram_stepvideo.planning.plan import plan_memory
    from lowvram_stepvideo.profiles import load_profile
    from lowvram_stepvideo.defaults import SpeedOptions
    folder, profile = open_model_folder(demo_dir), load_profile("cpu")
    plain = plan_memory(folder, profile, DEMO_PRESET).phases["denoise"].peak_vram_bytes   # the compute device
    cached = plan_memory(folder, profile, DEMO_PRESET, options=SpeedOptions(cache=0.1)).phases["denoise"]
    dim = folder.open("transformer").module.config.dim
    # sequential CFG: while the uncond branch runs, the cond branch's two saved (1, S, D) float32 residuals live
    assert cached.peak_vram_bytes - plain >= 2 * DEMO_PRESET.tokens * dim * 4
