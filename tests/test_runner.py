"""A job (run/job.py) behind generate.py on CPU with the demo model: the OOM ladder (injected memory limit),
smaller VAE tiles on a decode OOM, checkpoints / Ctrl-C / --resume (bit-identical), and the cpu vs cpu-lowram
profiles."""
import contextlib
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from lowvram_stepvideo.face import cli
from lowvram_stepvideo.pipeline import machine
from lowvram_stepvideo.run import ladder as ladders
from lowvram_stepvideo.planning.byte_count import ByteAccountant
from lowvram_stepvideo.pipeline.phases import PhasePipeline
from lowvram_stepvideo.pipeline.machine import DeviceRuntime
from lowvram_stepvideo.profiles import Preset, ladder_from
from lowvram_stepvideo.run import outputs
from lowvram_stepvideo.run.resume import checkpoint_path, save_checkpoint
from cli_support import loads_of, read_frames, read_sidecar, run_cli

pytestmark = pytest.mark.usefixtures("demo_env", "one_torch_thread")


def write_profile(folder, name: str, presets: list[str], tile: int = 0, overlap: int = 0, cfg: str = "batch"):
    """profiles/cpu.toml with other presets ('FxHxW', largest first), VAE tiling and CFG mode."""
    text = (ROOT / "profiles" / "cpu.toml").read_text()
    rows = "\n".join("  { frames = %s, height = %s, width = %s, steps = 1 }," % tuple(p.split("x")) for p in presets)
    text = re.sub(r"(?ms)^presets = \[.*?^\]", f"presets = [\n{rows}\n]", text)
    text = re.sub(r"(?m)^tile = \d+", f"tile = {tile}", text)
    text = re.sub(r"(?m)^overlap = \d+", f"overlap = {overlap}", text)
    text = re.sub(r'(?m)^cfg_mode = "\w+"', f'cfg_mode = "{cfg}"', text)
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


class Stop(Exception):
    """Ends a measuring run early."""


@contextlib.contextmanager
def phase_peaks(limit: int | None = None, stop_at: str | None = None):
    """Count live CPU bytes under a ByteAccountant (raising torch.OutOfMemoryError past `limit`); yields a dict
    phase -> peak bytes (largest over repeats). `stop_at`: raise Stop when that phase starts."""
    acc, peaks = ByteAccountant(limits=None if limit is None else {"cpu": limit}), {}
    original = DeviceRuntime.phase

    @contextlib.contextmanager
    def phase(self, name):
        if name == stop_at:
            raise Stop(name)
        acc.reset_peak()
        with original(self, name):
            yield
        peaks[name] = max(peaks.get(name, 0), acc.peak["cpu"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DeviceRuntime, "phase", phase)
        with acc:
            yield peaks


def count_calls(monkeypatch, cls, name: str) -> list:
    calls, original = [], getattr(cls, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)
    monkeypatch.setattr(cls, name, wrapper)
    return calls


# ---- out-of-memory ladder ----------------------------------------------------------------------------------------

def test_denoise_oom_steps_down_to_the_next_preset(demo_dir, tmp_path, capsys, monkeypatch):
    big, small = "34x128x192", "17x16x16"   # 576 and 3 DiT tokens
    profile = write_profile(tmp_path, "ladder", [big, small])
    base = ["--model-dir", demo_dir, "--profile", profile, "--prompt", "a lighthouse in a storm", "--steps", "1"]
    with pytest.raises(Stop), phase_peaks(stop_at="decode") as at_big:
        cli.main([str(a) for a in base + ["--output", tmp_path / "big.mp4"]])
    sizes = dict(zip(("--frames", "--height", "--width"), small.split("x")))
    with phase_peaks() as at_small:
        assert cli.main([str(a) for a in base + [x for kv in sizes.items() for x in kv] +
                         ["--output", tmp_path / "small.mp4"]]) == 0
    fits = max([at_big.get("text", 0)] + list(at_small.values()))
    assert fits < at_big["denoise"], (at_big, at_small)       # the test needs a denoise-only gap
    limit = (fits + at_big["denoise"]) // 2

    denoise_calls, loaded = count_calls(monkeypatch, PhasePipeline, "denoise"), loads_of(monkeypatch)
    with phase_peaks(limit=limit):
        rc, _, err = run_cli(capsys, *base, "--output", tmp_path / "out.mp4")
    assert rc == 0, err
    assert f"denoise: out of memory at {big}; memory freed, retrying at {small}" in err.splitlines()
    assert len(denoise_calls) == 2 and loaded.count("step_llm") <= 1   # the prompt is not encoded again
    meta = read_sidecar(tmp_path / "out.mp4")
    assert (meta["preset"], meta["frames"], meta["size"], meta["steps"]) == (small, 17, [16, 16], 1)
    assert read_frames(tmp_path / "out.mp4").shape == (17, 16, 16, 3)


@pytest.mark.slow
def test_decode_oom_retries_with_smaller_tiles_without_denoising_again(demo_dir, tmp_path, capsys, monkeypatch):
    """The limit: just above the measured peaks of a run decoding with the 1x8 tiles the fallback will use (the
    untiled decode needs 9/8 of the activations, so it must fail under that limit)."""
    profile = write_profile(tmp_path, "wide", ["17x16x144"])   # latents 1x9, untiled first (tile = 0)
    base = ["--model-dir", demo_dir, "--profile", profile, "--prompt", "a train on a bridge", "--steps", "1"]
    with phase_peaks() as tiled:
        assert cli.main([str(a) for a in base + ["--vae-tile", "8", "--output", tmp_path / "tiled.mp4"]]) == 0
    limit = max(tiled.values()) + 2**20

    denoise_calls = count_calls(monkeypatch, PhasePipeline, "denoise")
    with phase_peaks(limit=limit):
        rc, _, err = run_cli(capsys, *base, "--output", tmp_path / "out.mp4")
    assert rc == 0, err
    assert "decode: out of memory with 1x9 latent tiles; continuing with 1x8 (finished chunks are kept)" \
        in err.splitlines()
    assert len(denoise_calls) == 1 and tiled["decode"] > max(tiled["text"], tiled["denoise"])
    np.testing.assert_array_equal(read_frames(tmp_path / "out.mp4"), read_frames(tmp_path / "tiled.mp4"))


def test_text_oom_retries_streamed_then_fails_in_one_line(tmp_path, capsys):
    """The demo's text phase peak is activations, which streaming step_llm does not shrink: the retry is announced,
    then the run ends with a one-line error and writes nothing."""
    args = ["--demo", "--prompt", "neon lights on a wet street", "--no-text-cache", "--frames", "17", "--height", "16",
            "--width", "16", "--steps", "1", "--output", tmp_path / "v.mp4"]
    with pytest.raises(Stop), phase_peaks(stop_at="denoise") as peaks:
        cli.main([str(a) for a in args])
    with phase_peaks(limit=int(peaks["text"] * 0.9)):
        rc, _, err = run_cli(capsys, *args)
    assert rc == 2
    assert [ln for ln in err.splitlines() if "block streaming" not in ln] == [
        "out of memory in the text encoders; retrying with step_llm streamed block by block",
        "error: out of memory in the text encoders even with step_llm streamed; free GPU memory"]
    assert list(tmp_path.iterdir()) == []


def test_resume_ladder_starts_at_the_checkpoints_preset(tmp_path):
    ladder = [Preset(34, 64, 96, 4), Preset(17, 32, 48, 4), Preset(17, 16, 16, 4)]
    ckpt = tmp_path / "x.mp4.resume.safetensors"
    assert ladders.resume_ladder(ladder, ckpt) == ladder                    # no checkpoint: unchanged
    save_checkpoint(ckpt, torch.zeros(1), 2, {"preset": "17x32x48"})
    assert ladders.resume_ladder(ladder, ckpt) == ladder[1:]                # an earlier run stepped down
    assert ladder_from((Preset(34, 64, 96, 30), Preset(17, 16, 16, 30)), Preset(34, 64, 96, 4)) == \
        [Preset(34, 64, 96, 4), Preset(17, 16, 16, 4)]                      # fallbacks keep the steps asked for


# ---- checkpoints, Ctrl-C and --resume ----------------------------------------------------------------------------

def interrupt_dit(monkeypatch, after_forwards: int) -> dict:
    """While state['armed'], the DiT raises KeyboardInterrupt at the forward after `after_forwards` of them;
    state['forwards'] counts DiT forwards."""
    state, original = {"armed": True, "forwards": 0}, DeviceRuntime.load

    def hook(module, args):
        if state["armed"] and state["forwards"] == after_forwards:
            raise KeyboardInterrupt
        state["forwards"] += 1

    def load(self, component, dtype):
        model = original(self, component, dtype)
        if component == "transformer":
            model.register_forward_pre_hook(hook)
        return model
    monkeypatch.setattr(DeviceRuntime, "load", load)
    return state


def test_interrupt_then_resume_is_bit_identical(tmp_path, capsys, monkeypatch):
    size = ["--demo", "--prompt", "waves crash on black rocks", "--seed", "5", "--frames", "17", "--height", "16",
            "--width", "32", "--steps", "4", "--checkpoint-every", "2"]
    ref, work = tmp_path / "ref", tmp_path / "work"
    ref.mkdir(), work.mkdir()
    rc, _, err = run_cli(capsys, *size, "--output", ref / "v.mp4", "--save-latents", ref / "z.safetensors")
    assert rc == 0, err

    dit = interrupt_dit(monkeypatch, after_forwards=6)   # cfg sequential (cpu profile): two forwards per step
    saves = []
    monkeypatch.setattr(outputs, "save_checkpoint", lambda path, latents, step, request: (
        saves.append(step), save_checkpoint(path, latents, step, request)))
    out = ["--output", work / "v.mp4", "--save-latents", work / "z.safetensors"]
    rc, _, err = run_cli(capsys, *size, *out)
    ckpt = checkpoint_path(work / "v.mp4")
    assert rc == 130 and "Traceback" not in err
    assert err.splitlines()[-1] == f"interrupted after step 3; saved to {ckpt} (continue with --resume)"
    assert saves == [2, 3]                               # every 2 steps, then on Ctrl-C
    assert [p.name for p in work.iterdir()] == [ckpt.name]   # no video, no latents, no temp files
    saved = ckpt.read_bytes()

    rc, _, err = run_cli(capsys, *size, "--seed", "6", "--resume", *out)
    assert rc == 2 and err == (f"error: {ckpt} was saved for different settings (seed); use the same settings "
                               "or delete it to start fresh")
    assert ckpt.read_bytes() == saved

    dit.update(armed=False, forwards=0)
    rc, _, err = run_cli(capsys, *size, "--resume", *out)
    assert rc == 0, err
    assert f"resuming at step 3 of 4 from {ckpt}" in err.splitlines() and dit["forwards"] == 2
    assert torch.equal(load_file(str(work / "z.safetensors"))["latents"],
                       load_file(str(ref / "z.safetensors"))["latents"])
    np.testing.assert_array_equal(read_frames(work / "v.mp4"), read_frames(ref / "v.mp4"))
    assert not ckpt.exists()


def test_failed_decode_keeps_the_latents_and_resume_only_decodes(tmp_path, capsys, monkeypatch):
    args = ["--demo", "--prompt", "a robot waters flowers", "--frames", "17", "--height", "16", "--width", "16",
            "--steps", "2", "--output", tmp_path / "v.mp4"]

    def no_memory(self, latents, tile=None):
        raise torch.OutOfMemoryError("injected")
    with monkeypatch.context() as m:
        m.setattr(PhasePipeline, "decode", no_memory)
        rc, _, err = run_cli(capsys, *args)
    ckpt = checkpoint_path(tmp_path / "v.mp4")
    assert rc == 2 and [ln for ln in err.splitlines() if not ln.startswith("speed: ")] == [
        f"note: the denoised latents are kept in {ckpt}; run the same command with --resume to only decode",
        "error: out of memory: injected; use a smaller --profile or free GPU memory"]
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.name]

    loaded = loads_of(monkeypatch)
    rc, _, err = run_cli(capsys, *args, "--resume")
    assert rc == 0, err
    assert "transformer" not in loaded and read_frames(tmp_path / "v.mp4").shape == (17, 16, 16, 3)
    assert not ckpt.exists()


# ---- profiles cpu and cpu-lowram ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def profile_latents(tmp_path_factory, demo_cache):
    """Final latents of one request under several profiles (text encoders run each time), and which models each
    profile streamed from where."""
    folder = tmp_path_factory.mktemp("profiles")
    sequential = folder / "cpu-sequential.toml"   # profiles/cpu.toml but for the CFG mode
    cpu = (ROOT / "profiles" / "cpu.toml").read_text()
    sequential.write_text(re.sub(r'(?m)^cfg_mode = "\w+"', 'cfg_mode = "sequential"', cpu))
    latents, streamed = {}, {}
    with pytest.MonkeyPatch.context() as mp, _single_thread():
        mp.setenv("LOWVRAM_STEPVIDEO_CACHE", str(demo_cache))
        for name in ("cpu", "cpu-lowram", str(sequential)):
            streamed[name] = seen = []
            original = machine.attach_streaming
            mp.setattr(machine, "attach_streaming", lambda model, *a, seen=seen, original=original, **kw: (
                seen.append((type(model).__name__, kw.get("source"))), original(model, *a, **kw))[1])
            out = folder / f"{len(latents)}.safetensors"
            assert cli.main(["--demo", "--profile", name, "--prompt", "two dancers spin on a stage", "--no-text-cache",
                             "--frames", "17", "--height", "16", "--width", "16", "--steps", "2",
                             "--output", str(folder / f"{len(latents)}.mp4"), "--save-latents", str(out)]) == 0
            latents[name] = load_file(str(out))["latents"]
            mp.setattr(machine, "attach_streaming", original)
    return latents, streamed, str(sequential)


@contextlib.contextmanager
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_cpu_lowram_streams_from_disk_with_the_same_latents(profile_latents):
    latents, streamed, sequential = profile_latents
    assert streamed["cpu"] == []
    assert sorted(streamed["cpu-lowram"]) == [("Step1Model", "disk"), ("StepVideoModel", "disk")]
    assert torch.equal(latents["cpu-lowram"], latents[sequential])   # cpu.toml with cfg_mode = "sequential"


def test_cpu_and_cpu_lowram_profiles_give_identical_latents(profile_latents):
    latents, _, _ = profile_latents
    assert torch.equal(latents["cpu"], latents["cpu-lowram"])


def test_a_profile_the_plan_lowers_runs_in_a_new_pipeline(demo_dir, monkeypatch):
    """On a GPU (here a device named cuda, the fit faked) plan_ladder hands back a pipeline running the lowered
    profile; the pipeline it was given keeps its own."""
    from lowvram_stepvideo.loading.model_folder import open_model_folder
    from lowvram_stepvideo.profiles import load_profile, with_overrides
    folder, profile = open_model_folder(demo_dir), load_profile("cpu")
    pipe = PhasePipeline(folder, profile, progress=False, runtime=DeviceRuntime(folder, profile, "cuda"))
    lowered, ladder = with_overrides(profile, dit_resident_blocks=1), list(profile.presets)
    monkeypatch.setattr(ladders, "fit_to_card", lambda p, presets, *a, **kw: (presets[1:], lowered))
    got, ran = ladders.plan_ladder(pipe, ladder[0], None, lambda msg: None)
    assert got == ladder[1:] and ran.profile == lowered and ran.device.type == "cuda"
    assert pipe.profile == profile and ran.timings is pipe.timings
