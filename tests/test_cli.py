"""generate.py end to end on CPU with the demo model: outputs, sidecar, --decode-latents, the embedding cache,
--dry-run, turbo defaults and one-line errors. The demo model and the embedding cache live in a temp folder
(LOWVRAM_STEPVIDEO_CACHE); most runs are in-process (`cli.main`), the reference run is a real subprocess."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_support import leftovers, loads_of, read_frames, read_sidecar, run_cli, subprocess_env
from conftest import ROOT
from lowvram_stepvideo.face import cli
from lowvram_stepvideo.defaults import DEMO_PRESET
from lowvram_stepvideo.files.text_cache import EmbeddingCache
from lowvram_stepvideo.run import resume

PROMPT = "a red fox runs through fresh snow"
TINY = ["--frames", "17", "--height", "16", "--width", "16", "--steps", "1"]   # 3 latents of 1x1: fastest run


pytestmark = pytest.mark.usefixtures("demo_env", "one_torch_thread")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_cache):
    """`python generate.py --demo` as a user runs it (subprocess), keeping the final latents."""
    out = tmp_path_factory.mktemp("reference")
    argv = [sys.executable, str(ROOT / "generate.py"), "--demo", "--prompt", PROMPT, "--seed", "7",
            "--output", str(out / "fox.mp4"), "--save-latents", str(out / "fox.safetensors")]
    proc = subprocess.run(argv, capture_output=True, text=True, env=subprocess_env(demo_cache), cwd=out, timeout=300)
    return out, proc


def test_demo_run_writes_a_playable_mp4_and_a_sidecar(reference, demo_dir):
    out, proc = reference
    assert proc.returncode == 0, proc.stderr
    video, sidecar = (out / "fox.mp4").resolve(), (out / "fox.mp4.json").resolve()
    assert proc.stderr.splitlines()[-1] == (f"wrote {video} (34x64x96 frames x height x width, 25 fps) and "
                                            f"{sidecar}")
    # stderr is not a terminal: plain progress lines, no carriage returns, the decode total known from the start
    assert "\r" not in proc.stderr and "denoise: 4/4 steps (100%)" in proc.stderr
    decode = [ln for ln in proc.stderr.splitlines() if ln.startswith("decode: ")]
    assert decode[0].startswith("decode: 0/2 tiles (0%)") and decode[-1].startswith("decode: 2/2 tiles (100%)")
    frames = read_frames(out / "fox.mp4")
    assert frames.shape == (DEMO_PRESET.frames, DEMO_PRESET.height, DEMO_PRESET.width, 3)
    assert frames.std() > 1   # not a constant picture
    meta = read_sidecar(out / "fox.mp4")
    assert (meta["prompt"], meta["seed"], meta["model_dir"]) == (PROMPT, 7, str(demo_dir))
    assert (meta["preset"], meta["steps"], meta["guidance_scale"], meta["shift"]) == ("34x64x96", 4, 9.0, 13.0)
    assert (meta["frames"], meta["size"], meta["turbo"]) == (34, [64, 96], False)
    assert (meta["fps"], meta["width"], meta["height"], meta["duration_s"]) == (25, 96, 64, 1.36)
    assert meta["profile"]["name"] == "cpu" and meta["profile"]["vae"] == {"tile": 32, "overlap": 4}
    assert meta["arguments"]["checkpoint_every"] == 5 and meta["arguments"]["cache"] is True
    assert set(meta["timings_s"]) == {"text", "denoise", "decode"} and meta["total_s"] > 0
    assert meta["peak_host_bytes"] > 0 and meta["peak_vram_bytes"] is None   # CPU run
    latents = load_file(str(out / "fox.safetensors"))["latents"]
    assert latents.shape == (1, 6, 4, 4, 6) and latents.dtype == torch.float32
    # the resume checkpoint is removed after success, no temp files are left
    assert leftovers(out, {"fox.mp4", "fox.mp4.json", "fox.safetensors"}) == []


def test_decode_latents_alone_gives_the_same_frames(reference, tmp_path, capsys, monkeypatch):
    out, proc = reference
    assert proc.returncode == 0, proc.stderr
    loaded = loads_of(monkeypatch)
    rc, _, err = run_cli(capsys, "--demo", "--decode-latents", out / "fox.safetensors",
                         "--output", tmp_path / "again.mp4")
    assert rc == 0, err
    assert loaded == ["vae"]   # no text encoder, no DiT
    np.testing.assert_array_equal(read_frames(tmp_path / "again.mp4"), read_frames(out / "fox.mp4"))
    assert read_sidecar(tmp_path / "again.mp4")["frames"] == 34


def test_embedding_cache_skips_the_text_encoders(tmp_path, capsys, monkeypatch):
    loaded = loads_of(monkeypatch)
    prompt = "a hot air balloon rises over green fields"   # used by no other test
    metas = []
    for extra in ([], [], ["--no-text-cache"]):
        loaded.clear()
        rc, _, err = run_cli(capsys, "--demo", "--prompt", prompt, *TINY, "--output", tmp_path / "b.mp4",
                             "--overwrite", *extra)
        assert rc == 0, err
        meta = read_sidecar(tmp_path / "b.mp4")
        metas.append((list(loaded), "text: embeddings taken from the cache" in err, meta["text_from_cache"],
                      meta["timings_s"]["text"] > 0))
    encoders = ["step_llm", "hunyuan_clip", "transformer", "vae"]
    assert metas[0] == (encoders, False, False, True)           # a prompt not seen before: computed, stored
    assert metas[1] == (["transformer", "vae"], True, True, False)   # same prompt: from the cache, no text phase
    assert metas[2] == (encoders, False, False, True)           # --no-text-cache: computed again


def test_cache_entries_are_keyed_by_model_and_prompts_and_a_write_failure_is_only_a_warning(tmp_path, caplog):
    embeds = (torch.randn(2, 5, 3), torch.ones(2, 82, dtype=torch.int64), torch.randn(2, 77, 2))
    cache = EmbeddingCache("model-a", tmp_path / "ok")
    cache.put(["p", "n"], embeds)
    assert all(torch.equal(a, b) for a, b in zip(cache.get(["p", "n"]), embeds))
    assert cache.get(["p", "other"]) is None and EmbeddingCache("model-b", tmp_path / "ok").get(["p", "n"]) is None
    (tmp_path / "file").write_text("")
    blocked = EmbeddingCache("model-a", tmp_path / "file" / "embeddings")   # cannot be created
    blocked.put(["p", "n"], embeds)
    assert blocked.get(["p", "n"]) is None and "text embeddings not cached" in caplog.text


def test_the_cache_keeps_the_entries_used_last_within_its_size(tmp_path, monkeypatch):
    from lowvram_stepvideo.files import text_cache
    embeds = (torch.randn(2, 5, 3), torch.ones(2, 82, dtype=torch.int64), torch.randn(2, 77, 2))
    cache, long_ago = EmbeddingCache("model-a", tmp_path), time.time() - 100
    for i, prompt in enumerate(("a", "b")):
        cache.put([prompt, "n"], embeds)
        os.utime(cache._path([prompt, "n"]), (long_ago + i, long_ago + i))   # a written first, then b
    monkeypatch.setattr(text_cache, "MAX_BYTES", 2 * cache._path(["a", "n"]).stat().st_size)   # room for two
    assert cache.get(["a", "n"]) is not None            # a read now: used more recently than b
    cache.put(["c", "n"], embeds)
    assert [p for p in "abc" if cache._path([p, "n"]).exists()] == ["a", "c"]


def test_caches_keep_their_newest_files(tmp_path):
    """caches.trim, as the plan cache uses it (a number of entries); by size: the embedding cache, above."""
    from lowvram_stepvideo.files.caches import trim
    for i in range(5):
        (tmp_path / f"{i}.json").write_text("{}")
        os.utime(tmp_path / f"{i}.json", (1000 + i, 1000 + i))
    (tmp_path / "other.txt").write_text("")
    trim(tmp_path, "*.json", max_files=3)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["2.json", "3.json", "4.json", "other.txt"]


def test_dry_run_prints_the_plan(capsys):
    rc, out, err = run_cli(capsys, "--demo", "--prompt", PROMPT, "--dry-run")
    assert rc == 0, err
    assert "memory plan: profile cpu, 34x64x96" in out
    assert [ln.split()[0] for ln in out.splitlines()[2:7]] == ["text", "denoise", "decode", "write", "budget"]
    assert out.splitlines()[-1].startswith("verdict: fits in ")


def test_dry_run_json_rounds_the_size_with_a_warning(capsys, tmp_path):
    rc, out, err = run_cli(capsys, "--demo", "--prompt", PROMPT, "--dry-run", "--json",
                           "--frames", "20", "--height", "40", "--width", "50", "--output", tmp_path / "x.mp4")
    assert rc == 0, err
    assert err == "warning: 20x40x50 rounded to 17x32x48 (frames come in 17-frame chunks, sizes in multiples of 16)"
    plan = json.loads(out)
    assert plan["preset"] == "17x32x48" and plan["profile"] == "cpu"
    assert plan["peak_vram_bytes"] == max(p["peak_vram_bytes"] for p in plan["phases"].values()) > 0
    assert plan["peak_host_bytes"] == max(p["peak_host_bytes"] for p in plan["phases"].values())
    assert list(tmp_path.iterdir()) == []   # a dry run writes nothing


def turbo_folder(demo_dir, parent):
    """The demo model under a folder name that says turbo (links to its files)."""
    folder = parent / "stepvideo-t2v-turbo"
    folder.mkdir()
    for item in demo_dir.iterdir():
        (folder / item.name).symlink_to(item)
    return folder


@pytest.mark.slow
def test_turbo_defaults_from_flag_or_folder_name(demo_dir, tmp_path, capsys):
    size = ["--frames", "17", "--height", "16", "--width", "16"]
    runs = {"flag": ["--demo", "--turbo"], "folder": ["--model-dir", turbo_folder(demo_dir, tmp_path)]}
    for name, how in runs.items():
        rc, _, err = run_cli(capsys, *how, "--prompt", PROMPT, *size, "--output", tmp_path / f"{name}.mp4")
        assert rc == 0, err
    for name in ("flag", "folder"):
        meta = read_sidecar(tmp_path / f"{name}.mp4")
        assert (meta["steps"], meta["guidance_scale"], meta["shift"], meta["turbo"]) == (15, 5.0, 17.0, True), name
    # (a run without either: release defaults 9.0 / 13.0 and turbo false, see the reference run's sidecar)


# ---- one-line errors, nothing written ---------------------------------------------------------------------------

def _incomplete(demo_dir, parent):
    """The demo model without the VAE weights."""
    folder = parent / "incomplete"
    folder.mkdir()
    for item in demo_dir.iterdir():
        if item.name != "vae":
            (folder / item.name).symlink_to(item)
    (folder / "vae").mkdir()
    (folder / "vae" / "config.json").symlink_to(demo_dir / "vae" / "config.json")
    return folder


ERRORS = {  # name: (arguments, words the one error line must hold)
    "missing folder": (["--model-dir", "{tmp}/nowhere"],
                       ["not found", "hf download stepfun-ai/stepvideo-t2v --local-dir",
                        "modelscope download stepfun-ai/stepvideo-t2v --local-dir"]),
    "missing quantized folder": (["--model-dir", "{tmp}/stepvideo-t2v-int8"],
                                 ["stepvideo-t2v-int8 not found", "made by quantize.py from the release",
                                  "hf download stepfun-ai/stepvideo-t2v --local-dir {tmp}/stepvideo-t2v ",
                                  "python quantize.py --model-dir {tmp}/stepvideo-t2v --out {tmp}/stepvideo-t2v-int8 "
                                  "--format int8"]),
    "not a model folder": (["--model-dir", "{tmp}"], ["not a Step-Video model folder", "--model-dir"]),
    "incomplete folder": (["--model-dir", "{incomplete}"], ["vae", "no weights found"]),
    "no folder at all": ([], ["--model-dir", "--demo"]),
    "unknown profile": (["--demo", "--profile", "64gb"], ["unknown profile '64gb'", "cpu-lowram", "24gb"]),
    "cuda profile on cpu": (["--demo", "--profile", "24gb"], ["needs a CUDA GPU", "--profile cpu"]),
    "zero frames": (["--demo", "--frames", "0"], ["--frames 0", "multiples of 17"]),
    "negative height": (["--demo", "--height", "-16"], ["--height -16", "multiples of 16"]),
    "huge width": (["--demo", "--width", "9000"], ["64x9000", "544x992"]),
    "zero steps": (["--demo", "--steps", "0"], ["--steps 0", "at least 1"]),
    "zero shift": (["--demo", "--shift", "0"], ["--shift 0", "positive"]),
    "seed out of range": (["--demo", "--seed", str(2**64)], ["--seed 18446744073709551616", "2**64-1"]),
    "empty prompt": (["--demo", "--prompt", "  "], ["--prompt is empty"]),
    "output under a file": (["--demo", "--output", "{demo}/model_index.json/out.mp4"], ["is a file, not a folder"]),
    "not an mp4": (["--demo", "--output", "{tmp}/out.avi"], ["--output", "only MP4", "out.mp4"]),
    "output is a folder": (["--demo", "--output", "{tmp}"], ["it is a folder"]),
    "latents under a file": (["--demo", "--save-latents", "{demo}/model_index.json/z.safetensors"],
                             ["is a file, not a folder"]),
    "json without dry run": (["--demo", "--json"], ["--json", "--dry-run"]),
    "not a latents file": (["--demo", "--decode-latents", "{demo}/vae/config.json"], ["not a latents file"]),
    "latents of another model": (["--demo", "--decode-latents", "{other}"], ["(1, 3, 16, 2, 3)", "(1, T, 4, h, w)"]),
    "nothing to resume": (["--demo", "--resume"] + TINY, ["nothing to resume", "without --resume"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_line_and_write_nothing(case, demo_dir, tmp_path, capsys):
    args, words = ERRORS[case]
    work = tmp_path / "work"
    work.mkdir()
    fill = {"tmp": work, "demo": demo_dir, "incomplete": _incomplete(demo_dir, tmp_path) if "incomplete" in case
            else None, "other": tmp_path / "z16.safetensors"}
    other = torch.zeros(1, 3, 16, 2, 3)   # 16 latent channels, demo has 4
    save_file({"latents": other}, str(fill["other"]), metadata=resume.signed(other, {"kind": "latents"}))
    argv = [a.format(**fill) for a in args]
    if "--prompt" not in argv:
        argv += ["--prompt", PROMPT]
    if "--output" not in argv:
        argv += ["--output", str(work / "out.mp4")]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for word in words:
        assert word.format(**fill) in err, (word, err)
    assert list(work.iterdir()) == []


@pytest.mark.slow
def test_ctrl_c_in_a_real_process_saves_and_exits_130(tmp_path, demo_cache):
    """SIGINT while denoising (a run far too long to finish): exit code 130, one message, the checkpoint on disk
    and nothing else. Slow: a real process (torch's import) run up to its first checkpoint; the quick run keeps
    SIGINT to a real process in test_faults_runs.py (exit 130, one line) and the checkpoint of an interrupted
    denoise in process (test_runner.py's test_interrupt_then_resume_is_bit_identical)."""
    out = tmp_path / "long.mp4"
    ckpt = out.with_name(out.name + ".resume.safetensors")
    proc = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), "--demo", "--prompt", PROMPT, *TINY[:-2],
                             "--steps", "1000", "--checkpoint-every", "1", "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env=subprocess_env(demo_cache))
    try:
        deadline = time.monotonic() + 120
        while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    last = stderr.splitlines()[-1]
    assert re.fullmatch(rf"interrupted after step \d+; saved to {re.escape(str(ckpt))} \(continue with --resume\)",
                        last), stderr
    assert "Traceback" not in stderr and stdout == ""
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.name]


def test_help_has_examples_and_describes_every_flag(capsys):
    parser = cli.build_parser()
    undescribed = [a.option_strings[0] for a in parser._actions if not (a.help or "").strip()]
    assert undescribed == []
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:\n  generate.py --demo --prompt" in text
    flat = " ".join(text.split())                                          # argparse wraps the flag help
    assert "default: auto" in flat and "with --demo: cpu" in flat          # the default profile is named
    assert "204x544x992@50 is 204 frames" in flat and "(height x width) in 50 denoising steps" in flat
    assert "seed of the initial noise" in flat and "2**64-1" in flat
    assert "exit status:" in flat and "130 interrupted" in flat
