"""Fault suite, part 1 (issue #9): outputs never destroy inputs, a checkpoint belongs to its weights and request,
NaN never reaches a video, disk-full and read-only places, atomic writes, concurrent writers and SIGKILL resume.
Every run is the demo model at a tiny size, in-process (`cli.main`) except the SIGKILL one."""
import contextlib
import errno
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from cli_support import loads_of, read_sidecar, run_cli, subprocess_env
from conftest import ROOT
from faults_support import (DIT, PROMPT, TINY, files_in, model_copy, read_all, replace_file, run_error, run_ok)
from lowvram_stepvideo.face import cli
from lowvram_stepvideo.loading import demo
from lowvram_stepvideo.files import fsutil, video
from lowvram_stepvideo.run import job, outputs, resume
from lowvram_stepvideo.pipeline import phases
from lowvram_stepvideo.pipeline.phases import PhasePipeline
from lowvram_stepvideo.tools.quantize_folder import quantize_folder
from lowvram_stepvideo.run.resume import checkpoint_path

pytestmark = pytest.mark.usefixtures("demo_env", "one_torch_thread")


def _fail_decode(self, latents, tile=None):
    raise torch.OutOfMemoryError("injected")


@pytest.fixture(scope="module")
def made(tmp_path_factory, demo_cache):
    """A finished run (video, sidecar, saved latents) and a run whose decode failed (its checkpoint is kept)."""
    out = tmp_path_factory.mktemp("made")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(demo.CACHE_ENV, str(demo_cache))
        args = ["--demo", "--prompt", PROMPT, "--seed", "3", *TINY]
        assert cli.main(args + ["--output", str(out / "v.mp4"), "--save-latents", str(out / "z.safetensors")]) == 0
        mp.setattr(PhasePipeline, "decode", _fail_decode)
        assert cli.main(args + ["--output", str(out / "k.mp4")]) == 2
    assert checkpoint_path(out / "k.mp4").is_file()
    return out


# ---- 1. outputs never destroy inputs ----------------------------------------------------------------------------

@pytest.mark.parametrize("clash", ["decode input", "model file", "save-latents = output", "save-latents = sidecar",
                                   "save-latents = checkpoint", "profile"])
def test_output_colliding_with_an_input_or_another_output_is_refused_before_any_work(clash, made, demo_dir,
                                                                                     tmp_path, capsys, monkeypatch):
    model = model_copy(demo_dir, tmp_path / "m")
    out = tmp_path / "o.mp4"
    base = ["--model-dir", model, "--prompt", PROMPT, *TINY]
    z = tmp_path / "z.safetensors"
    z.write_bytes((made / "z.safetensors").read_bytes())
    profile = tmp_path / "p.toml"
    profile.write_text((ROOT / "profiles" / "cpu.toml").read_text())
    argv, victim = {
        "decode input": (["--model-dir", model, "--decode-latents", z, "--output", z], z),
        "model file": (base + ["--output", model / "vae" / "vae_v2.safetensors"], model / "vae" / "vae_v2.safetensors"),
        "save-latents = output": (base + ["--output", out, "--save-latents", out], None),
        "save-latents = sidecar": (base + ["--output", out, "--save-latents", f"{out}.json"], None),
        "save-latents = checkpoint": (base + ["--output", out, "--save-latents", checkpoint_path(out)], None),
        "profile": (base + ["--profile", profile, "--output", profile], profile),
    }[clash]
    before = victim.read_bytes() if victim else None
    loaded = loads_of(monkeypatch)
    err = run_error(capsys, *argv)
    assert ("would overwrite" in err or "is the same file as" in err), err
    assert loaded == [] and not out.exists()
    if victim:
        assert victim.read_bytes() == before


@pytest.mark.slow
def test_existing_output_is_kept_unless_overwrite(made, tmp_path, capsys):
    out = tmp_path / "o.mp4"
    out.write_bytes(b"precious")
    argv = ["--demo", "--prompt", PROMPT, *TINY, "--output", out]
    err = run_error(capsys, *argv)
    assert "already exists" in err and "--overwrite" in err and out.read_bytes() == b"precious"
    run_ok(capsys, *argv, "--overwrite")
    assert out.read_bytes()[4:8] == b"ftyp" and read_sidecar(out)["guidance_scale"] == 9.0


def test_default_names_have_no_spaces_and_are_made_unique(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = outputs.plan_outputs(None, prompt="a cat, playing   piano!")
    assert first.output.parent == outputs.RESULTS and first.output.parent.is_dir()
    assert " " not in first.output.name and first.output.name.startswith("a_cat_playing_piano-")
    first.output.write_bytes(b"x")
    second = outputs.plan_outputs(None, prompt="a cat, playing   piano!")
    assert second.output != first.output and not second.output.exists()
    first.output.unlink()
    checkpoint_path(first.output).write_bytes(b"x")   # an earlier run's checkpoint also takes the name
    assert outputs.plan_outputs(None, prompt="a cat, playing   piano!").output != first.output


def test_a_run_never_discards_an_earlier_runs_checkpoint(made, tmp_path, capsys):
    out = tmp_path / "k.mp4"
    ckpt = checkpoint_path(out)
    ckpt.write_bytes(checkpoint_path(made / "k.mp4").read_bytes())
    argv = ["--demo", "--prompt", PROMPT, "--seed", "3", *TINY, "--output", out]
    err = run_error(capsys, *argv)
    assert str(ckpt) in err and "--resume" in err and "--overwrite" in err and ckpt.exists()
    err = run_ok(capsys, *argv, "--resume")          # continues it: only the decode was left
    assert "resuming at step 2 of 2" in err and out.exists() and not ckpt.exists()
    ckpt.write_bytes(checkpoint_path(made / "k.mp4").read_bytes())
    out.unlink()
    run_ok(capsys, *argv, "--overwrite")             # starts again, then removes it
    assert out.exists() and not ckpt.exists()


def test_temp_files_carry_their_owner_end_in_tmp_and_orphans_are_cleaned(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, live_pid = int(dead.stdout), os.getppid()
    host = fsutil.temp_prefix(tmp_path / "x").split("-")[1]
    orphan = tmp_path / f".o.mp4.lvtmp-{host}-{dead_pid}-abc.mp4.tmp"      # SIGKILL during the mp4 encode
    live = tmp_path / f".o.mp4.lvtmp-{host}-{live_pid}-abc.mp4.tmp"        # a writer still running
    foreign = tmp_path / f".o.mp4.lvtmp-00000000-{dead_pid}-abc.mp4.tmp"   # another host's (shared folder)
    for p in (orphan, live, foreign):
        p.write_bytes(b"partial")
    seen = []
    original = video._encode

    def encode(tmp, *args):
        seen.append(tmp.name)
        return original(tmp, *args)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(video, "_encode", encode)
        run_ok(capsys, "--demo", "--prompt", PROMPT, *TINY, "--output", tmp_path / "o.mp4")
    assert seen[0].startswith(fsutil.temp_prefix(tmp_path / "o.mp4")) and seen[0].endswith(".mp4.tmp")
    assert not orphan.exists() and live.exists() and foreign.exists()
    assert [p.name for p in tmp_path.glob("*.mp4")] == ["o.mp4"]   # a temp file is never taken for a result


def test_concurrent_writers_leave_one_complete_file_and_no_temp_files(tmp_path):
    path = tmp_path / "c.safetensors"
    payloads = [torch.full((64, 64), float(i)) for i in range(4)]

    def write(i):
        for _ in range(10):
            resume.save_checkpoint(path, payloads[i], i, {"writer": i})
    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tensors, meta = read_all(path)
    i = int(meta["next_step"])
    assert torch.equal(tensors["latents"], payloads[i]) and files_in(tmp_path) == ["c.safetensors"]


# ---- 2. a checkpoint belongs to its weights and its request ------------------------------------------------------

@pytest.mark.parametrize("change", ["dit edited in place", "re-quantized int8 -> fp8"])
def test_resume_on_other_weights_is_refused_naming_them(change, demo_dir, tmp_path, capsys, monkeypatch):
    model = tmp_path / "m"
    if change == "dit edited in place":
        model_copy(demo_dir, model)
    else:
        quantize_folder(demo_dir, model, "int8", components=("transformer",), log=lambda m: None)
    out = tmp_path / "k.mp4"
    argv = ["--model-dir", model, "--prompt", PROMPT, *TINY, "--output", out]
    with monkeypatch.context() as m:
        m.setattr(PhasePipeline, "decode", _fail_decode)
        run_error(capsys, *argv)
    saved = checkpoint_path(out).read_bytes()
    if change == "dit edited in place":
        tensors, meta = read_all(model / DIT)
        tensors["adaln_single.linear.bias"] = tensors["adaln_single.linear.bias"] + 1
        replace_file(model / DIT, tensors, meta)
    else:
        quantize_folder(demo_dir, model, "fp8", components=("transformer",), force=True, log=lambda m: None)
    err = run_error(capsys, *argv, "--resume")
    assert "different settings (transformer weights)" in err, err
    assert checkpoint_path(out).read_bytes() == saved and not out.exists()


def _tamper(src, dst, change, sign=True):
    """A copy of `src` changed by `change`; signed: with its checksum made again (as a buggy writer would leave it),
    so that the checks beneath the checksum are what is tested."""
    tensors, meta = read_all(src)
    change(tensors, meta)
    replace_file(dst, tensors, resume.signed(tensors["latents"], meta) if sign else meta)


TAMPERED = {  # name: (change to a valid checkpoint, words of the error)
    "next step past the end": (lambda t, m: m.update(next_step="999"), "not in 0..2"),
    "negative next step": (lambda t, m: m.update(next_step="-7"), "not in 0..2"),
    "latents of another shape": (lambda t, m: t.update(latents=torch.zeros(1, 6, 4, 2, 2)), "(1, 3, 4, 1, 1)"),
    "NaN latents": (lambda t, m: t["latents"].view(-1)[0].fill_(float("nan")), "NaN"),
    "int64 latents": (lambda t, m: t.update(latents=t["latents"].long()), "int64"),
    "request is a list": (lambda t, m: m.update(request="[1, 2]"), "not a JSON object"),
    "saved latents": (lambda t, m: (m.pop("next_step"), m.update(kind="latents")), "not a resume checkpoint"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_checkpoint_is_refused(case, made, tmp_path, capsys, monkeypatch):
    change, words = TAMPERED[case]
    out = tmp_path / "k.mp4"
    _tamper(checkpoint_path(made / "k.mp4"), checkpoint_path(out), change)
    loaded = loads_of(monkeypatch)
    err = run_error(capsys, "--demo", "--prompt", PROMPT, "--seed", "3", *TINY, "--output", out, "--resume")
    assert words in err and loaded == [] and not out.exists(), err


EDITED = {  # by hand after it was written, checksum left alone: (change to a checkpoint of next step 1, words)
    "a flipped latent bit": (lambda t, m: t["latents"].view(torch.int32).view(-1)[0].bitwise_xor_(1),
                             "checksum mismatch"),
    "next step set forward": (lambda t, m: m.update(next_step="2"), "checksum mismatch"),
    "next step set back": (lambda t, m: m.update(next_step="0"), "checksum mismatch"),
    "seed edited in the request": (lambda t, m: m.update(request=m["request"].replace('"seed": 3', '"seed": 4')),
                                   "checksum mismatch"),
    "checksum removed": (lambda t, m: m.pop("checksum"), "no checksum"),
}


@pytest.mark.parametrize("case", list(EDITED))
def test_a_checkpoint_edited_by_hand_is_refused_naming_it(case, made, tmp_path, capsys, monkeypatch):
    change, words = EDITED[case]
    out = tmp_path / "k.mp4"
    ckpt = checkpoint_path(out)
    _tamper(checkpoint_path(made / "k.mp4"), ckpt, lambda t, m: m.update(next_step="1"))   # a run stopped at 1
    _tamper(ckpt, ckpt, change, sign=False)
    before = ckpt.read_bytes()
    loaded = loads_of(monkeypatch)
    seed = "4" if "seed" in case else "3"
    err = run_error(capsys, "--demo", "--prompt", PROMPT, "--seed", seed, *TINY, "--output", out, "--resume")
    assert words in err and str(ckpt) in err and loaded == [] and not out.exists(), err
    assert ckpt.read_bytes() == before


def test_the_checksum_covers_the_latents_and_every_metadata_entry(made):
    tensors, meta = read_all(checkpoint_path(made / "k.mp4"))
    latents = tensors["latents"]
    assert meta["checksum"] == resume.checksum(latents, meta)
    for key in meta:
        if key != "checksum":
            assert resume.checksum(latents, {**meta, key: meta[key] + " "}) != meta["checksum"], key
    assert resume.checksum(latents, {**meta, "extra": "1"}) != meta["checksum"]
    assert resume.checksum(latents.flatten(), meta) != meta["checksum"]          # the shape counts
    assert resume.checksum(latents.double(), meta) != meta["checksum"]           # and the dtype


BAD_LATENTS = {
    "a resume checkpoint": (None, "is a resume checkpoint"),
    "NaN": (lambda t, m: t["latents"].view(-1)[0].fill_(float("inf")), "NaN or inf"),
    "int64": (lambda t, m: t.update(latents=t["latents"].long()), "int64"),
    "batch 3": (lambda t, m: t.update(latents=t["latents"].repeat(3, 1, 1, 1, 1)), "(3, 3, 4, 1, 1)"),
    "zero latent frames": (lambda t, m: t.update(latents=t["latents"][:, :0]), "(1, 0, 4, 1, 1)"),
    "another VAE": (lambda t, m: m.update(request=m["request"].replace('"vae": "', '"vae": "0')), "other VAE"),
}


@pytest.mark.parametrize("case", list(BAD_LATENTS))
def test_decode_latents_refuses_what_is_not_good_latents(case, made, tmp_path, capsys, monkeypatch):
    change, words = BAD_LATENTS[case]
    z = tmp_path / "z.safetensors"
    if change is None:
        z.write_bytes(checkpoint_path(made / "k.mp4").read_bytes())
    else:
        _tamper(made / "z.safetensors", z, change)
    loaded = loads_of(monkeypatch)
    err = run_error(capsys, "--demo", "--decode-latents", z, "--output", tmp_path / "d.mp4")
    assert words in err and loaded == [] and files_in(tmp_path) == ["z.safetensors"], err


def test_saved_latents_record_the_request_and_decode_to_the_same_video(made, tmp_path, capsys):
    _, meta = read_all(made / "z.safetensors")
    assert meta["kind"] == "latents" and '"seed": 3' in meta["request"] and '"vae": "' in meta["request"]
    run_ok(capsys, "--demo", "--decode-latents", made / "z.safetensors", "--output", tmp_path / "d.mp4")
    assert (tmp_path / "d.mp4").stat().st_size > 0


# ---- 3. NaN never reaches a video ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cache", [[], ["--step-cache", "0.99"]])
def test_nan_latents_stop_the_run_naming_the_step_and_keep_the_last_good_checkpoint(tmp_path, capsys, monkeypatch,
                                                                                    cache):
    """With the step cache, step 2's check waits for a later read (pipeline/step_reads.py): the checkpoint save
    after step 2 reads it first, so NaN latents are never saved."""
    out = tmp_path / "n.mp4"
    euler, calls = phases.euler_step, []

    def poisoned(*args):   # the latents of step 2 turn NaN (as a NaN weight would make them)
        calls.append(1)
        return euler(*args) * (float("nan") if len(calls) == 2 else 1)
    monkeypatch.setattr(phases, "euler_step", poisoned)
    err = run_error(capsys, "--demo", "--prompt", PROMPT, *TINY[:-1], "3", "--checkpoint-every", "1",
                    "--output", out, *cache)
    ckpt = checkpoint_path(out)
    assert "NaN or infinite at step 2 of 3" in err and "likely cause" in err and f"{ckpt} is kept" in err, err
    assert files_in(tmp_path) == [ckpt.name] and read_all(ckpt)[1]["next_step"] == "1"


def test_sidecar_is_strict_json_and_a_non_finite_value_is_refused_before_writing(tmp_path):
    path = tmp_path / "o.mp4.json"
    with pytest.raises(video.VideoError, match=r"timings_s\.denoise is not a finite number"):
        video.write_sidecar(path, {"prompt": "x", "timings_s": {"denoise": float("nan")}})
    assert files_in(tmp_path) == []


# ---- 5. disk full and read-only places ---------------------------------------------------------------------------

def _disk_full_on(calls: set, original):
    count = {"n": 0}

    def save(*args, **kwargs):
        count["n"] += 1
        if count["n"] in calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(*args, **kwargs)
    return save


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    out = tmp_path / "d.mp4"
    ckpt = checkpoint_path(out)
    on_disk = {}
    monkeypatch.setattr(resume, "save_file", _disk_full_on({2}, resume.save_file))
    original_save = job._save

    def save(pipe, path, latents, step, fingerprint):   # the checkpoint on disk before steps 2 and 3 are saved
        on_disk[step] = ckpt.read_bytes() if step > 1 else None
        return original_save(pipe, path, latents, step, fingerprint)
    monkeypatch.setattr(job, "_save", save)
    err = run_ok(capsys, "--demo", "--prompt", PROMPT, *TINY[:-1], "3", "--checkpoint-every", "1", "--output", out)
    assert (f"warning: could not save the checkpoint after step 2 (No space left on device); the previous "
            f"checkpoint in {ckpt} is kept") in err.splitlines()
    assert on_disk[3] == on_disk[2]   # the step-1 checkpoint survived the failed write of step 2
    assert out.exists() and not ckpt.exists() and files_in(tmp_path) == ["d.mp4", "d.mp4.json"]


def test_a_failed_sidecar_write_is_one_line(tmp_path, capsys, monkeypatch):
    original = video.new_file

    @contextlib.contextmanager
    def full_for_json(path, suffix="", *args):
        if suffix == ".json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        with original(path, suffix, *args) as out:
            yield out
    argv = ["--demo", "--prompt", PROMPT, *TINY, "--output", tmp_path / "s.mp4"]
    with monkeypatch.context() as m:
        m.setattr(video, "new_file", full_for_json)
        rc, _, err = run_cli(capsys, *argv)
    assert rc == 2 and err.splitlines()[-2:] == [
        f"note: the denoised latents are kept in {checkpoint_path(tmp_path / 's.mp4')}; run the same command with "
        "--resume --overwrite to only decode",
        f"error: could not write {tmp_path / 's.mp4.json'}: No space left on device"]
    loaded = loads_of(monkeypatch)
    run_ok(capsys, *argv, "--resume", "--overwrite")   # the disk has room again: the kept latents are decoded
    assert "transformer" not in loaded and files_in(tmp_path) == ["s.mp4", "s.mp4.json"]



def test_demo_with_a_read_only_cache_falls_back_or_says_where_it_must_write(demo_dir, tmp_path, monkeypatch):
    cache, fallback_root = tmp_path / "ro-cache", tmp_path / "tmp"
    monkeypatch.setenv(demo.CACHE_ENV, str(cache))
    monkeypatch.setattr(demo.tempfile, "tempdir", str(fallback_root))
    original = demo._build

    def build(final, *kind):
        if cache in final.parents or (fallback_root in final.parents and state["tmp_ro"]):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return original(final, *kind)
    state = {"tmp_ro": False}
    monkeypatch.setattr(demo, "_build", build)
    fallback = fallback_root / f"lowvram-stepvideo-{os.getuid()}" / demo_dir.name
    model_copy(demo_dir, fallback)       # what a build there would make (building again costs seconds)
    assert demo.build_demo_model() == fallback
    state["tmp_ro"] = True
    with pytest.raises(demo.DemoError, match=f"cannot build the demo model in {cache}.*{demo.CACHE_ENV}"):
        demo.build_demo_model()


# ---- 6. SIGKILL, then --resume: bit-identical --------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path, capsys, demo_cache):
    argv = ["--demo", "--prompt", PROMPT, "--seed", "9", "--frames", "17", "--height", "16", "--width", "32",
            "--steps", "6", "--checkpoint-every", "1", "--no-text-cache"]
    run_ok(capsys, *argv, "--output", tmp_path / "ref.mp4", "--save-latents", tmp_path / "ref.safetensors")
    out = tmp_path / "k.mp4"
    slow = ("import sys, time; from lowvram_stepvideo.face import cli; from lowvram_stepvideo.run import outputs; "
            "save = outputs.save_checkpoint; outputs.save_checkpoint = lambda *a: (save(*a), time.sleep(0.5)); "
            "sys.exit(cli.main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", slow, *argv, "--output", str(out)], cwd=ROOT,
                            env={**subprocess_env(demo_cache), "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and \
                resume.saved_request(checkpoint_path(out)) is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL and checkpoint_path(out).is_file() and not out.exists()
    err = run_ok(capsys, *argv, "--output", out, "--save-latents", tmp_path / "z.safetensors", "--resume")
    assert "resuming at step" in err
    assert torch.equal(load_file(str(tmp_path / "z.safetensors"))["latents"],
                       load_file(str(tmp_path / "ref.safetensors"))["latents"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp file left behind
