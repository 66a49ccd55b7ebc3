"""CFG and sequence parallel (lowvram_stepvideo/engines/parallel.py) on the CPU with gloo: 2 and 4 processes
started with torchrun's environment give the single-process latents; a dead or hung rank ends the others in bounded
time."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lowvram_stepvideo.engines import parallel
from lowvram_stepvideo.profiles import load_profile
from lowvram_stepvideo.pipeline.machine import DeviceRuntime

from conftest import ROOT, fixture_dirs

sys.path.insert(0, str(Path(__file__).parent))
import parallel_worker  # noqa: E402

TOLERANCE = 1e-4   # relative to the largest latent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(world: int, args: list[str], timeout_s: float = 60, script: Path = None) -> list[subprocess.Popen]:
    """`world` processes of `script` (default: tests/parallel_worker.py) with the environment torchrun gives."""
    port = free_port()
    script = script or Path(__file__).parent / "parallel_worker.py"
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), parallel.TIMEOUT_ENV: str(timeout_s)}
        procs.append(subprocess.Popen([sys.executable, str(script)] + args, env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, timeout_s: float) -> list[tuple[int, str]]:
    """(exit status, stderr) of every process; any still running after timeout_s is killed and fails the test."""
    deadline, results = time.monotonic() + timeout_s, []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"rank {procs.index(p)} still running after {timeout_s} s")
        results.append((p.returncode, err))
    return results


def single_process(folder: Path) -> torch.Tensor:
    return parallel_worker.denoise(folder, lambda mf: DeviceRuntime(mf, load_profile("cpu"), log=lambda m: None))


def check_run(world: int, folders: list[Path], out: Path) -> None:
    results = finish(start_ranks(world, [str(out)] + [str(f) for f in folders]), timeout_s=240)
    assert all(code == 0 for code, _ in results), [err[-2000:] for _, err in results]
    modes = ["cfg", "sequence"] if world == 2 else ["auto", "sequence"]
    for i, folder in enumerate(folders):
        ref = single_process(folder)
        for mode in modes:
            for rank in range(world):
                got = torch.load(out / f"{i}-{mode}-rank{rank}.pt")
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                assert err <= TOLERANCE, f"{folder.name} {mode} rank {rank}: relative error {err:.2g}"


# ---------------------------------------------------------------- layouts (no processes)

def test_layouts_for_modes_and_rank_counts():
    assert parallel.layout_for("cfg", 2, 1) == parallel.Layout(2, 1, cfg=2, sequence=1)
    assert parallel.layout_for("sequence", 3, 2) == parallel.Layout(3, 2, cfg=1, sequence=3)
    both = parallel.layout_for("auto", 4, 3)
    assert (both.cfg, both.sequence, both.cfg_rank, both.seq_rank) == (2, 2, 1, 1)
    assert parallel.layout_for("auto", 3).cfg == 1      # odd: no CFG split
    assert parallel.layout_for("auto", 2).cfg == 2
    with pytest.raises(parallel.ParallelError, match="exactly 2 processes"):
        parallel.layout_for("cfg", 4)
    with pytest.raises(parallel.ParallelError, match="choose one of"):
        parallel.layout_for("tensor", 2)


def test_token_runs_cover_the_sequence_in_order():
    assert parallel.token_counts(36, 4) == [9, 9, 9, 9]
    assert parallel.token_counts(7, 3) == [3, 2, 2]
    assert parallel.token_counts(1, 2) == [1, 0]


def test_timeout_from_environment(monkeypatch):
    monkeypatch.setenv(parallel.TIMEOUT_ENV, "12.5")
    assert parallel.collective_timeout().total_seconds() == 12.5
    monkeypatch.setenv(parallel.TIMEOUT_ENV, "soon")
    with pytest.raises(parallel.ParallelError, match=parallel.TIMEOUT_ENV):
        parallel.collective_timeout()


# ---------------------------------------------------------------- real process groups (gloo)

@pytest.mark.slow
def test_two_processes_cfg_and_sequence_equal_one_process(tmp_path, demo_dir, ti2v_demo_dir):
    """TI2V too: its condition latents and motion score split with the latents (CFG) and the tokens (sequence)."""
    check_run(2, [fixture_dirs()[0] / "model_dir", demo_dir, ti2v_demo_dir], tmp_path)


@pytest.mark.slow
def test_four_processes_cfg_x_sequence_and_sequence_equal_one_process(tmp_path, demo_dir, ti2v_demo_dir):
    check_run(4, [fixture_dirs()[0] / "model_dir", demo_dir, ti2v_demo_dir], tmp_path)


@pytest.mark.slow
def test_a_hung_rank_ends_the_others_at_the_timeout(tmp_path):
    """Rank 1 stops answering after its first step; rank 0 must end with an error, not wait forever. (A killed
    rank: test_killed_rank_ends_the_run_with_one_line_and_resume_on_one_process.)"""
    procs = start_ranks(2, ["--hang-after-steps", "1", str(tmp_path), str(fixture_dirs()[0] / "model_dir")],
                        timeout_s=5)
    start = time.monotonic()
    try:
        procs[0].wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("rank 0 still waits for a rank that is gone")
    finally:
        procs[1].kill()
        for p in procs:
            p.communicate()
    assert procs[0].returncode != 0
    assert time.monotonic() - start < 120
    assert not list(tmp_path.glob("*.pt"))   # nobody finished


# ---------------------------------------------------------------- generate.py under torchrun

PROMPT = "a cat playing piano"


def demo_args(out: Path, steps: int, *extra) -> list[str]:
    return ["--demo", "--prompt", PROMPT, "--steps", str(steps), "--output", str(out / "video.mp4"), *extra]


def api_latents(demo_dir: Path, steps: int) -> torch.Tensor:
    """The single-process latents of the demo request generate.py makes (no decode)."""
    from lowvram_stepvideo import StepVideoPipeline
    from lowvram_stepvideo.defaults import DEMO_PRESET
    pipe = StepVideoPipeline.from_pretrained(demo_dir, "cpu", log=lambda m: None)
    with torch.no_grad():
        return pipe(prompt=PROMPT, num_frames=DEMO_PRESET.frames, height=DEMO_PRESET.height,
                    width=DEMO_PRESET.width, num_inference_steps=steps, seed=0, output_type="latent")


def saved_latents(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file
    return load_file(str(path))["latents"]


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.slow
def test_generate_under_torchrun_only_rank0_writes(tmp_path, demo_env, demo_dir, one_torch_thread):
    out = tmp_path / "out"
    out.mkdir()
    args = demo_args(out, 2, "--parallel", "sequence", "--save-latents", str(out / "latents.safetensors"))
    results = finish(start_ranks(2, args, script=ROOT / "generate.py"), timeout_s=300)
    assert [code for code, _ in results] == [0, 0], [err[-1500:] for _, err in results]
    assert sorted(p.name for p in out.iterdir()) == ["latents.safetensors", "video.mp4", "video.mp4.json"]
    assert "wrote" in results[0][1] and "wrote" not in results[1][1]
    assert '"parallel": "2 processes: sequence x2"' in (out / "video.mp4.json").read_text()
    assert relative_error(saved_latents(out / "latents.safetensors"), api_latents(demo_dir, 2)) <= TOLERANCE


@pytest.mark.slow
def test_generate_image_to_video_under_torchrun_cfg(tmp_path, demo_env, ti2v_demo_dir, one_torch_thread):
    """TI2V under torchrun (CFG: each rank one branch): rank 0 encodes the first image and every rank conditions on
    its latent; the latents equal a single process's."""
    from conftest import ti2v_fixture
    from lowvram_stepvideo import StepVideoPipeline
    from lowvram_stepvideo.defaults import DEMO_PRESET
    image, out = ti2v_fixture() / "first_image.png", tmp_path / "out"
    out.mkdir()
    args = demo_args(out, 2, "--image", str(image), "--parallel", "cfg", "--save-latents",
                     str(out / "latents.safetensors"))
    results = finish(start_ranks(2, args, script=ROOT / "generate.py"), timeout_s=300)
    assert [code for code, _ in results] == [0, 0], [err[-1500:] for _, err in results]
    pipe = StepVideoPipeline.from_pretrained(ti2v_demo_dir, "cpu", log=lambda m: None)
    with torch.no_grad():
        ref = pipe(prompt=PROMPT, image=image, num_frames=DEMO_PRESET.frames, height=DEMO_PRESET.height,
                   width=DEMO_PRESET.width, num_inference_steps=2, seed=0, output_type="latent")
    assert relative_error(saved_latents(out / "latents.safetensors"), ref) <= TOLERANCE


@pytest.mark.slow
def test_killed_rank_ends_the_run_with_one_line_and_resume_on_one_process(tmp_path, demo_env, demo_dir, capsys,
                                                                          one_torch_thread):
    """2 processes (cfg); rank 1 is killed once rank 0 has saved a checkpoint; rank 0 ends with one line and the
    checkpoint; `--resume` in a single process then finishes with the uninterrupted single-process latents."""
    from cli_support import run_cli
    steps, out = 40, tmp_path
    args = demo_args(out, steps, "--checkpoint-every", "1", "--save-latents", str(out / "latents.safetensors"))
    procs = start_ranks(2, args + ["--parallel", "cfg"], script=ROOT / "generate.py")
    ckpt = out / "video.mp4.resume.safetensors"
    deadline = time.monotonic() + 240
    while not ckpt.exists() and procs[0].poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    procs[1].kill()
    killed = time.monotonic()
    (code, err), _ = finish(procs, timeout_s=120)
    assert time.monotonic() - killed < 120
    assert code == 2, err[-2000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "lost the other processes" in errors[0] and "--resume" in errors[0], err[-2000:]
    assert ckpt.is_file() and not (out / "video.mp4").exists()
    rc, _, log = run_cli(capsys, *args, "--resume")
    assert rc == 0, log
    assert "resuming at step" in log
    assert relative_error(saved_latents(out / "latents.safetensors"), api_latents(demo_dir, steps)) <= TOLERANCE


def test_parallel_flag_without_torchrun_is_one_line(capsys, monkeypatch):
    from cli_support import run_cli
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rc, _, err = run_cli(capsys, "--demo", "--prompt", "x", "--parallel", "cfg")
    assert rc == 2 and err.startswith("error: --parallel cfg needs several processes") and "torchrun" in err


@pytest.mark.slow
def test_plan_per_rank_divides_activations_not_weights(demo_dir):
    """The sequence split's rank plans less denoise memory than one process (activations split; the weights, the
    same on every rank, are in both), and the same text phase."""
    from lowvram_stepvideo.loading.model_folder import open_model_folder
    from lowvram_stepvideo.planning.plan import plan_per_rank
    from lowvram_stepvideo.planning.plan import plan_memory
    from lowvram_stepvideo.profiles import Preset
    folder, profile, preset = open_model_folder(demo_dir), load_profile("cpu"), Preset(34, 256, 256, 1)
    alone = plan_memory(folder, profile, preset)
    split = plan_per_rank(folder, profile, preset, parallel.layout_for("sequence", 2))
    weights = sum(t.numel() * t.element_size() for t in folder.open("transformer").load(
        profile.torch_dtype, "cpu").state_dict().values())
    assert split.phases["text"] == alone.phases["text"]
    assert weights < split.phases["denoise"].peak_vram_bytes < alone.phases["denoise"].peak_vram_bytes
    activations = alone.phases["denoise"].peak_vram_bytes - weights
    assert split.phases["denoise"].peak_vram_bytes - weights < 0.75 * activations
    # what a run under torchrun fits its presets with (run.job.fit_to_card, --dry-run) is the rank's plan
    from lowvram_stepvideo.planning.plan import fit_profile
    _, fitted = fit_profile(folder, profile, preset, 2**40, layout=parallel.layout_for("sequence", 2, rank=1))
    assert fitted.phases["denoise"] == split.phases["denoise"]
