"""Batches (generate.py --prompts-file) on the demo model: one text phase for all prompts, one video each, a rerun
that does nothing, a failing prompt that does not stop the batch, a killed batch that resumes to the same videos."""
import contextlib
import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from cli_support import loads_of, read_frames, read_sidecar, run_cli, subprocess_env
from conftest import ROOT
from lowvram_stepvideo.face import batch
from lowvram_stepvideo.files import text_cache
from lowvram_stepvideo.run import job
from lowvram_stepvideo.errors import UsageError
from lowvram_stepvideo.pipeline.machine import DeviceRuntime
from lowvram_stepvideo.run.resume import checkpoint_path

pytestmark = pytest.mark.usefixtures("demo_env", "one_torch_thread")
TINY = ["--frames", "17", "--height", "16", "--width", "16", "--steps", "3"]
PROMPTS = "# a night's queue\na lantern floats on a lake\n\nsnow falls on a quiet village --seed 4\n一只猫在弹钢琴\n"
NAMES = ["0002-a_lantern_floats_on_a_lake-seed0.mp4", "0004-snow_falls_on_a_quiet_village-seed4.mp4",
         "0005-一只猫在弹钢琴-seed0.mp4"]   # file names keep the letters of every script (outputs.name_words)


def prompts_file(folder, text=PROMPTS):
    path = folder / "night.txt"
    path.write_text(text, encoding="utf-8")
    return path


def phases_of(monkeypatch) -> list[str]:
    """Names of the pipeline phases entered from now on."""
    seen, original = [], DeviceRuntime.phase

    @contextlib.contextmanager
    def phase(self, name):
        seen.append(name)
        with original(self, name):
            yield
    monkeypatch.setattr(DeviceRuntime, "phase", phase)
    return seen


def summary(out) -> dict:
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def test_prompts_file_form():
    items = batch.items_from_prompts(["a cat --seed 9", "a dog"], seeds=[1, 2])
    assert items == [batch.BatchItem(1, "a cat", 9), batch.BatchItem(2, "a dog", 1), batch.BatchItem(2, "a dog", 2)]
    assert batch.parse_seeds("0, 5,7") == [0, 5, 7]
    with pytest.raises(UsageError, match="integers separated by commas"):
        batch.parse_seeds("1,x")


def test_bad_prompts_files_fail_in_one_line(tmp_path, capsys):
    empty = prompts_file(tmp_path, "# only a comment\n\n")
    rc, _, err = run_cli(capsys, "--demo", "--prompts-file", empty)
    assert rc == 2 and err == f"error: --prompts-file {empty} has no prompts (one per line; '#' starts a comment line)"
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    rc, _, err = run_cli(capsys, "--demo", "--prompts-file", tmp_path / "latin1.txt")
    assert rc == 2 and "is not UTF-8 text; save it as UTF-8" in err
    rc, _, err = run_cli(capsys, "--demo", "--prompts-file", empty, "--prompt", "x")
    assert rc == 2 and err.startswith("error: --prompt does not go with --prompts-file")
    rc, _, err = run_cli(capsys, "--demo", "--prompt", "x", "--seeds", "1,2")
    assert rc == 2 and err == "error: --seeds goes with --prompts-file"


@pytest.mark.slow
def test_three_prompts_one_text_phase_three_videos_and_a_rerun_does_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(text_cache, "default_cache_dir", lambda: tmp_path / "embeddings")   # nothing cached yet
    path, out = prompts_file(tmp_path), tmp_path / "out"
    loaded, phases = loads_of(monkeypatch), phases_of(monkeypatch)
    rc, _, err = run_cli(capsys, "--demo", "--prompts-file", path, "--output-dir", out, *TINY)
    assert rc == 0, err
    assert loaded.count("step_llm") == 1 and loaded.count("hunyuan_clip") == 1 and phases.count("text") == 1
    assert loaded.count("transformer") == 3 and phases.count("decode") == 3
    assert sorted(p.name for p in out.glob("*.mp4")) == sorted(NAMES)
    got = summary(out)
    assert got["ok"] and [(v["line"], v["seed"], v["state"], v["preset"]) for v in got["videos"]] == [
        (2, 0, "done", "17x16x16"), (4, 4, "done", "17x16x16"), (5, 0, "done", "17x16x16")]
    assert set(got["videos"][0]["seconds"]) == {"denoise", "decode"}   # text: the shared phase
    assert read_sidecar(out / NAMES[1])["prompt"] == "snow falls on a quiet village"

    single = tmp_path / "single.mp4"   # the same video made alone: the batch changes nothing in the result
    rc, _, err = run_cli(capsys, "--demo", "--prompt", "snow falls on a quiet village", "--seed", "4", *TINY,
                         "--output", single)
    assert rc == 0, err
    np.testing.assert_array_equal(read_frames(out / NAMES[1]), read_frames(single))

    loaded.clear(), phases.clear()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "summary.json"}
    rc, _, err = run_cli(capsys, "--demo", "--prompts-file", path, "--output-dir", out, *TINY)
    assert rc == 0, err
    assert loaded == [] and phases == []
    assert [v["state"] for v in summary(out)["videos"]] == ["skipped"] * 3
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "summary.json"} == before


@pytest.mark.slow
def test_a_failing_prompt_is_recorded_and_the_batch_goes_on(tmp_path, capsys, monkeypatch):
    """Out of memory at every preset of one prompt (injected): recorded, the next is made, exit status 4."""
    original = job.denoise

    def denoise(pipe, req, *args, **kwargs):
        if req.prompt.startswith("snow"):
            raise torch.OutOfMemoryError("injected")
        return original(pipe, req, *args, **kwargs)
    monkeypatch.setattr(job, "denoise", denoise)
    out, path = tmp_path / "out", prompts_file(tmp_path, "snow falls on a quiet village\na lantern floats on a lake\n")
    rc, _, err = run_cli(capsys, "--demo", "--prompts-file", path, "--output-dir", out, *TINY[:-1], "1")
    assert rc == 4, err
    videos = summary(out)["videos"]
    assert [v["state"] for v in videos] == ["failed", "done"] and not summary(out)["ok"]
    assert videos[0]["error"] == "out of memory even at 17x16x16; use a smaller --profile or free GPU memory"
    made = out / "0002-a_lantern_floats_on_a_lake-seed0.mp4"
    assert list(out.glob("*.mp4")) == [made]

    monkeypatch.setattr(job, "denoise", original)   # memory back: --overwrite makes both again
    before = made.stat().st_mtime_ns
    rc, _, err = run_cli(capsys, "--demo", "--prompts-file", path, "--output-dir", out, *TINY[:-1], "1", "--overwrite")
    assert rc == 0, err
    assert [v["state"] for v in summary(out)["videos"]] == ["done", "done"] and made.stat().st_mtime_ns != before


KILLER = """
import os, signal, sys
from lowvram_stepvideo.face import cli
from lowvram_stepvideo.pipeline.machine import DeviceRuntime
original, dits = DeviceRuntime.load, []

def load(self, component, dtype):
    model = original(self, component, dtype)
    if component == "transformer":
        dits.append(model)
        if len(dits) == 2:   # the second video: killed at its 4th DiT forward, mid-denoising
            calls = []
            model.register_forward_pre_hook(
                lambda m, a: os.kill(os.getpid(), signal.SIGKILL) if calls.append(1) or len(calls) == 4 else None)
    return model

DeviceRuntime.load = load
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_killed_batch_resumes_and_ends_with_the_uninterrupted_videos(tmp_path, capsys, demo_cache):
    path = prompts_file(tmp_path)
    argv = ["--demo", "--prompts-file", str(path), *TINY, "--checkpoint-every", "1"]
    rc, _, err = run_cli(capsys, *argv, "--output-dir", tmp_path / "straight")
    assert rc == 0, err

    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLER, *argv, "--output-dir", str(out)], capture_output=True,
                          text=True, env={**subprocess_env(demo_cache), "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ckpt = checkpoint_path(out / NAMES[1])
    assert (out / NAMES[0]).is_file() and ckpt.is_file() and not (out / NAMES[1]).exists()

    rc, _, err = run_cli(capsys, *argv, "--output-dir", out)
    assert rc == 0, err
    assert any("resuming at step" in line for line in err.splitlines())
    assert [v["state"] for v in summary(out)["videos"]] == ["skipped", "done", "done"] and not ckpt.exists()
    for name in NAMES:
        np.testing.assert_array_equal(read_frames(out / name), read_frames(tmp_path / "straight" / name))
