"""Fault suite, part 3 (issue #19): runs that meet lose nothing (real processes at one --output, default names in
the same second, a batch that would write over its prompts file), no traceback from any count, full disk or
Ctrl-C at any moment, and --resume after an interrupted decode. In-process runs of the demo model at a tiny size
unless the case needs real processes."""
import datetime
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from cli_support import loads_of, read_sidecar, run_cli, subprocess_env
from conftest import ROOT
from faults_support import PROMPT, TINY, files_in, run_error, run_ok
from lowvram_stepvideo.face import batch
from lowvram_stepvideo.files import fsutil
from lowvram_stepvideo.pipeline.phases import PhasePipeline
from lowvram_stepvideo.run import outputs, resume
from lowvram_stepvideo.run.resume import checkpoint_path

pytestmark = pytest.mark.usefixtures("demo_env", "one_torch_thread")

# A generate.py run in its own process. argv[1]: a folder where the placement of each .mp4 waits until two
# processes are there, or the other run has ended without getting there ("-": no wait); argv[2]: "claims" or
# "no-claims" (only the placement keeps them apart); argv[3]: a fixed clock for default names ("-": the real one);
# the rest: generate.py's arguments.
RUNNER = """
import datetime, os, sys, time
from pathlib import Path
from lowvram_stepvideo.face import cli
from lowvram_stepvideo.files import fsutil
from lowvram_stepvideo.run import outputs

meet, claims, clock = sys.argv[1:4]
if claims == "no-claims":
    outputs.claim = lambda path: fsutil.Claim(path, None)
if clock != "-":
    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls.fromisoformat(clock)
    outputs.datetime = type("m", (), {"datetime": Frozen})
if meet != "-":
    place = fsutil.place
    def at_once(tmp, path, replace=True):
        if str(path).endswith(".mp4"):
            Path(meet, str(os.getpid())).touch()
            deadline = time.monotonic() + 120
            while len(os.listdir(meet)) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        return place(tmp, path, replace)
    fsutil.place = at_once
try:
    sys.exit(cli.main(sys.argv[4:]))
finally:   # a run refused before its placement: the other stops waiting for it
    if meet != "-":
        Path(meet, f"{os.getpid()}.ended").touch()
"""


def _two_runs(tmp_path, demo_cache, argvs, meet=False, claims=True, clock="-"):
    """Start both runs at once; [(exit status, stderr)] in the order given."""
    meeting = tmp_path / "meet"
    meeting.mkdir(exist_ok=True)
    env = {**subprocess_env(demo_cache), "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", RUNNER, str(meeting) if meet else "-",
                               "claims" if claims else "no-claims", clock, *map(str, argv)],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for argv in argvs]
    return [(p.wait(timeout=300), p.stderr.read()) for p in procs]


def _wrote(stderr: str) -> list[str]:
    return [ln.split()[1] for ln in stderr.splitlines() if ln.startswith("wrote ")]


# ---- 1. runs that meet -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["claims", pytest.param("placement only, at the same moment", marks=pytest.mark.slow)])
def test_two_processes_given_the_same_output_one_writes_the_other_says_so(how, tmp_path, demo_cache):
    out = tmp_path / "cc.mp4"
    argvs = [["--demo", "--prompt", PROMPT, *TINY, "--seed", str(s), "--output", out] for s in (1, 2)]
    results = _two_runs(tmp_path, demo_cache, argvs, meet=how != "claims", claims=how == "claims")
    assert sorted(rc for rc, _ in results) == [0, 2], results
    (_, won), (_, lost) = sorted(results)
    assert _wrote(won) == [str(out.resolve())] and _wrote(lost) == [] and "Traceback" not in won + lost
    error = [ln for ln in lost.splitlines() if ln.startswith("error: ")]
    assert len(error) == 1 and str(out) in error[0], lost
    assert ("another run (process" in error[0] or "already exists" in error[0] if how == "claims"
            else "was created by another program while this run worked; it is kept" in error[0]
            # (a slower loser may find the winner's resume checkpoint first: refused there, nothing lost either)
            or "holds the denoising of an earlier run" in error[0]), error
    winner = [rc for rc, _ in results].index(0) + 1
    assert read_sidecar(out)["seed"] == winner and out.stat().st_size > 0
    assert not [n for n in files_in(tmp_path) if n.startswith(".") and "lvtmp" in n]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["claims", "placement only, at the same moment"])
def test_two_default_named_runs_in_the_same_second_both_keep_their_video(how, tmp_path, demo_cache):
    # no checkpoints: nothing of either run is on disk before its video, so without claims both pick the same name
    argvs = [["--demo", "--prompt", "same", *TINY, "--seed", str(s), "--checkpoint-every", "0"] for s in (1, 2)]
    results = _two_runs(tmp_path, demo_cache, argvs, meet=how != "claims", claims=how == "claims",
                        clock="2031-05-06T07:08:09")
    assert [rc for rc, _ in results] == [0, 0], results
    written = [Path(_wrote(err)[0]) for _, err in results]
    assert sorted(p.name for p in written) == ["same-20310506-070809-2.mp4", "same-20310506-070809.mp4"]
    assert [read_sidecar(p)["seed"] for p in written] == [1, 2]
    assert sorted(files_in(tmp_path / "results")) == sorted([p.name for p in written] +
                                                            [p.name + ".json" for p in written])
    if how != "claims":
        assert any("was created by another program meanwhile; writing same-20310506-070809-2.mp4 instead" in err
                   for _, err in results), results


def test_a_name_is_placed_only_where_free_even_without_hard_links(tmp_path, monkeypatch):
    taken = tmp_path / "v.mp4"
    taken.write_bytes(b"first")
    for links in (True, False):
        if not links:   # a file system without hard links: an exclusive create, then the rename
            monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError(errno.EPERM, "no links")))
        with pytest.raises(FileExistsError):
            with fsutil.atomic_path(taken, ".mp4", replace=False) as tmp:
                tmp.write_bytes(b"second")
        assert taken.read_bytes() == b"first" and files_in(tmp_path) == ["v.mp4"]
        with fsutil.new_file(taken, ".mp4", replace=False, next_name=lambda p: p.with_name("w.mp4")) as f:
            f.tmp.write_bytes(b"third")
        assert f.path == tmp_path / "w.mp4" and f.path.read_bytes() == b"third" and taken.read_bytes() == b"first"
        f.path.unlink()


def test_a_claim_holds_until_released_or_its_process_dies(tmp_path):
    path = tmp_path / "c.mp4"
    held = fsutil.claim(path)
    assert held is not None and fsutil.claim(path) is None                  # held (another open file, one process)
    assert fsutil.holder(path) == f"process {os.getpid()}"
    with pytest.raises(outputs.OutputError, match=f"another run \\(process {os.getpid()}\\) is writing {path}"):
        outputs.plan_outputs(path)
    held.release()
    assert files_in(tmp_path) == []                                         # released: no file left behind
    again = fsutil.claim(path)
    assert again is not None
    again.release()
    killed = subprocess.run([sys.executable, "-c", "import os, signal, sys; from lowvram_stepvideo.files import "
                             "fsutil; fsutil.claim(sys.argv[1]); os.kill(os.getpid(), signal.SIGKILL)",
                             str(tmp_path / "k.mp4")], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert killed.returncode == -signal.SIGKILL and ".k.mp4.lvlock" in files_in(tmp_path)
    assert fsutil.clean_orphans(tmp_path) == [tmp_path / ".k.mp4.lvlock"]   # the dead run's lock is cleared
    assert fsutil.claim(tmp_path / "k.mp4") is not None


def test_a_batch_never_writes_over_its_prompts_file_or_a_file_that_is_not_its_summary(tmp_path, capsys):
    folder = tmp_path / "bo"
    folder.mkdir()
    prompts = folder / "summary.json"
    prompts.write_text("a lantern floats on a lake\n", encoding="utf-8")
    err = run_error(capsys, "--demo", "--prompts-file", prompts, "--output-dir", folder, *TINY)
    assert f"the batch summary {prompts} would overwrite {prompts}" in err and "--output-dir" in err
    assert prompts.read_text(encoding="utf-8") == "a lantern floats on a lake\n"
    assert files_in(folder) == ["summary.json"]

    notes = tmp_path / "notes"   # a summary.json of the user's in the output folder
    notes.mkdir()
    (notes / "summary.json").write_text("my notes")
    err = run_error(capsys, "--demo", "--prompts-file", prompts, "--output-dir", notes, *TINY)
    assert "is not a batch summary" in err and (notes / "summary.json").read_text() == "my notes"

    clash = tmp_path / "clash"   # the prompts file has the name of the video its first line makes
    clash.mkdir()
    named = clash / "0001-a_cat-seed0.mp4"
    named.write_text("a cat\n", encoding="utf-8")
    rc, _, err = run_cli(capsys, "--demo", "--prompts-file", named, "--output-dir", clash, *TINY)
    assert rc == 4 and "would overwrite the input" in err and named.read_text(encoding="utf-8") == "a cat\n", err


# ---- 2. no traceback ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["--steps", "1000000000000"], "--steps 1000000000000: needs at least 1 denoising step and at most 1000"),
    (["--frames", "1000000000000"], "beyond what the model was trained for"),
    (["--width", "1000000000000"], "beyond what the model was trained for"),
    (["--steps", "1000000000000", "--dry-run"], "--steps 1000000000000"),
    (["--seed", str(2**70)], "2**64-1"),
], ids=["steps", "frames", "width", "steps dry-run", "seed"])
def test_huge_counts_are_refused_in_one_line(argv, words, tmp_path, capsys, monkeypatch):
    loaded = loads_of(monkeypatch)
    err = run_error(capsys, "--demo", "--prompt", PROMPT, *argv, "--output", tmp_path / "h.mp4")
    assert words in err and loaded == [] and files_in(tmp_path) == [], err


def test_a_size_beyond_the_machines_memory_is_one_line(tmp_path, capsys, monkeypatch):
    def huge(self, embeds, latents, *args):   # what the CPU allocator raises for a size far beyond the RAM
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 35184372088832 bytes. Error code 12")
    monkeypatch.setattr(PhasePipeline, "denoise", huge)
    err = run_error(capsys, "--demo", "--prompt", PROMPT, *TINY, "--output", tmp_path / "m.mp4")
    assert err == ("error: out of host memory (32768.0 GiB at once); choose a smaller size or fewer frames, or close "
                   "other programs"), err


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                   SafetensorError("Error while serializing: IoError(No space left on device)")],
                         ids=["OSError", "SafetensorError"])
def test_a_full_disk_while_saving_a_checkpoint_is_a_warning_and_the_run_goes_on(error, tmp_path, capsys, monkeypatch):
    def full(tensors, filename, metadata=None):
        raise error
    monkeypatch.setattr(resume, "save_file", full)
    out = tmp_path / "d.mp4"
    err = run_ok(capsys, "--demo", "--prompt", PROMPT, *TINY, "--checkpoint-every", "1", "--output", out)
    warned = [ln for ln in err.splitlines() if ln.startswith("warning: could not save the checkpoint after step 1 (")]
    assert len(warned) == 1 and "No space left on device" in warned[0], err
    assert warned[0].endswith("); no checkpoint is kept"), err
    assert files_in(tmp_path) == ["d.mp4", "d.mp4.json"]


def test_a_full_disk_while_saving_latents_is_one_line(tmp_path, capsys, monkeypatch):
    def full(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")
    monkeypatch.setattr(resume, "save_file", full)
    err = run_error(capsys, "--demo", "--prompt", PROMPT, *TINY, "--checkpoint-every", "0", "--output",
                    tmp_path / "l.mp4", "--save-latents", tmp_path / "l.safetensors")
    assert f"could not write --save-latents {tmp_path / 'l.safetensors'} (Error while serializing" in err


def test_a_full_disk_while_writing_the_batch_summary_is_a_warning(tmp_path, capsys, monkeypatch):
    original = batch.atomic_path

    def full(path, suffix="", *args):
        if path.name == batch.SUMMARY_NAME:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(path, suffix, *args)
    monkeypatch.setattr(batch, "atomic_path", full)
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"{PROMPT}\n", encoding="utf-8")
    rc, _, err = run_cli(capsys, "--demo", "--prompts-file", prompts, "--output-dir", tmp_path / "o", *TINY)
    assert rc == 0 and "Traceback" not in err, err
    assert err.splitlines()[-2:] == ["batch: 1 of 1 videos finished; no summary file",
                                     f"warning: could not write {tmp_path / 'o' / 'summary.json'} (No space left on "
                                     "device); the table above is all of the summary"]
    assert len(list((tmp_path / "o").glob("*.mp4"))) == 1


def _loading_torch(pid: int) -> bool:
    """Has the process started loading torch (inside the scripts' own Ctrl-C guard, past Python's start-up)?"""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _interrupt(argv: list, delay: float, cwd: Path, demo_cache) -> tuple[int, str]:
    proc = subprocess.Popen([sys.executable, *map(str, argv)], cwd=cwd, env=subprocess_env(demo_cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _loading_torch(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, err


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see torch load")
@pytest.mark.parametrize("script, delay", [
    ("generate.py", 0.0), ("quantize.py", 0.0),
    *[pytest.param("generate.py", d, marks=pytest.mark.slow) for d in (0.3, 1.0, 2.0, 3.0, 4.5)],
    pytest.param("quantize.py", 1.0, marks=pytest.mark.slow),
])
def test_ctrl_c_at_any_moment_exits_130_with_one_line(script, delay, tmp_path, demo_cache, demo_dir):
    """SIGINT from the moment torch starts loading (`delay` seconds after: 0 is in the middle of `import torch`, the
    first second of a run) to the end of the run."""
    argv = ([ROOT / "generate.py", "--demo", "--prompt", PROMPT, *TINY[:-1], "12", "--output", tmp_path / "i.mp4"]
            if script == "generate.py" else
            [ROOT / "quantize.py", "--model-dir", demo_dir, "--out", tmp_path / "q", "--format", "int8"])
    rc, err = _interrupt(argv, delay, tmp_path, demo_cache)
    assert "Traceback" not in err and "Exception ignored" not in err, err
    if rc == 0 and delay > 0:   # it finished first (on a busy machine, torch can be seen loading late)
        return
    assert rc == 130, err
    said = [ln for ln in err.splitlines() if "interrupted" in ln]
    assert len(said) == 1 and said[0] == err.splitlines()[-1], err


# ---- 3. --resume after an interrupted decode ---------------------------------------------------------------------

def _interrupted_decode(self, latents, tile=None):
    raise KeyboardInterrupt


@pytest.mark.parametrize("every", ["1", "0"], ids=["with its checkpoint", "no checkpoint: the saved latents"])
def test_resume_after_an_interrupted_decode_needs_no_overwrite(every, tmp_path, capsys, monkeypatch):
    out, z = tmp_path / "r.mp4", tmp_path / "r.safetensors"
    argv = ["--demo", "--prompt", PROMPT, "--seed", "5", *TINY, "--checkpoint-every", every, "--output", out,
            "--save-latents", z]
    with monkeypatch.context() as m:
        m.setattr(PhasePipeline, "decode", _interrupted_decode)
        rc, _, err = run_cli(capsys, *argv)
    assert rc == 130 and "Traceback" not in err, err
    if every == "1":
        assert err.splitlines()[-1] == (f"interrupted while decoding; the denoised latents are kept in "
                                        f"{checkpoint_path(out)}: run the same command with --resume to only decode")
    saved = load_file(str(z))["latents"]
    loaded = loads_of(monkeypatch)
    err = run_ok(capsys, *argv, "--resume")
    assert "transformer" not in loaded and out.is_file() and torch.equal(load_file(str(z))["latents"], saved), err
    assert files_in(tmp_path) == ["r.mp4", "r.mp4.json", "r.safetensors"]
    assert read_sidecar(out)["seed"] == 5


def test_resume_still_refuses_saved_latents_of_another_request(tmp_path, capsys, monkeypatch):
    out, z = tmp_path / "r.mp4", tmp_path / "r.safetensors"
    base = ["--demo", "--prompt", PROMPT, *TINY, "--output", out, "--save-latents", z]
    with monkeypatch.context() as m:
        m.setattr(PhasePipeline, "decode", _interrupted_decode)
        run_cli(capsys, *base, "--seed", "5")
    checkpoint_path(out).unlink()
    before = z.read_bytes()
    err = run_error(capsys, *base, "--seed", "6", "--resume")
    assert str(z) in err and z.read_bytes() == before, err


# ---- 4. names ----------------------------------------------------------------------------------------------------

def test_prompt_derived_names_keep_the_letters_of_every_script_and_only_safe_characters():
    assert outputs.name_words("一只猫在弹钢琴") == "一只猫在弹钢琴"
    assert outputs.name_words("Ünïcode: café / naïve") == "Ünïcode_café_naïve"
    assert outputs.name_words("../../etc/passwd\x00\u202e") == "etc_passwd"
    assert outputs.name_words("--rm -rf *") == "rm_-rf"
    assert outputs.name_words("हिन्दी") == "हिन्दी"   # combining vowel signs kept
    long = outputs.name_words("猫" * 200, limit=200)
    assert len(long.encode()) <= outputs.NAME_BYTES and set(long) == {"猫"}
    when = datetime.datetime(2031, 5, 6, 7, 8, 9)
    assert outputs.default_name("一只猫在弹钢琴", when) == "一只猫在弹钢琴-20310506-070809.mp4"
    assert outputs.default_name("!!!", when) == "video-20310506-070809.mp4"


def test_the_batch_table_lines_up_with_wide_characters():
    rows = [batch.Row(1, "一只猫在弹钢琴，窗外下着雪，一只猫在弹钢琴", 0, "a.mp4", "done"),
            batch.Row(2, "a cat", 0, "b.mp4", "done")]
    lines = batch.summary_table(batch.BatchReport(rows, 1.0, Path("s.json"))).splitlines()[1:4]

    def cells(text):
        return sum(2 if "\u4e00" <= c <= "\u9fff" or c == "，" else 1 for c in text)
    assert len({cells(ln.split("done")[0]) for ln in lines[1:]}) == 1, lines
    assert "~" in lines[1]


def test_missing_output_folders_are_created(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_ok(capsys, "--demo", "--prompt", PROMPT, *TINY, "--output", "videos/cat.mp4", "--save-latents",
           "latents/cat.safetensors")
    assert (tmp_path / "videos" / "cat.mp4").is_file() and (tmp_path / "latents" / "cat.safetensors").is_file()
