"""CFG and sequence parallel (lowvram_stepvideo/parallel.py) on the CPU with gloo: 2 and 4 processes started with
torchrun's environment give the single-process latents; a dead or hung rank ends the others in bounded time."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lowvram_stepvideo import parallel
from lowvram_stepvideo.profiles import load_profile
from lowvram_stepvideo.runtime import DeviceRuntime

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
def test_two_processes_cfg_and_sequence_equal_one_process(tmp_path, demo_dir):
    check_run(2, [fixture_dirs()[0] / "model_dir", demo_dir], tmp_path)


@pytest.mark.slow
def test_four_processes_cfg_x_sequence_and_sequence_equal_one_process(tmp_path, demo_dir):
    check_run(4, [fixture_dirs()[0] / "model_dir", demo_dir], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["--die-after-steps", "--hang-after-steps"])
def test_a_dead_or_hung_rank_ends_the_others(tmp_path, fault):
    """Rank 1 dies (or stops answering) after its first step; rank 0 must end with an error, not wait forever."""
    procs = start_ranks(2, [fault, "1", str(tmp_path), str(fixture_dirs()[0] / "model_dir")], timeout_s=5)
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
