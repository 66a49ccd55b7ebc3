"""The memory plan (--dry-run) on fake tensors: full-size targets per profile, and the demo end to end."""
import json
import subprocess
import sys
import time

import pytest

from conftest import ROOT, link_tree
from sparse_release import write_sparse_release

GiB = 2**30
# profile -> most device memory the full-length plan may predict (204 frames, 544x992; issue targets)
TARGETS = {"24gb": 22, "16gb": 15, "12gb": 11}


@pytest.fixture(scope="module")
def sparse_release(tmp_path_factory):
    return write_sparse_release(tmp_path_factory.mktemp("sparse") / "stepvideo-t2v")


def _dry_run(model_dir, profile: str) -> tuple[dict, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model-dir", str(model_dir), "--profile",
                           profile, "--prompt", "a plan", "--dry-run", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), time.perf_counter() - start


@pytest.mark.parametrize("profile", sorted(TARGETS))
def test_full_size_plan_fits_the_tier(sparse_release, profile):
    """In process, as the dry-run computes it (resident blocks fitted to the tier's nominal card)."""
    from lowvram_stepvideo.loading.model_folder import open_model_folder
    from lowvram_stepvideo.planning.plan import fit_profile
    from lowvram_stepvideo.profiles import load_profile
    tier = load_profile(profile)
    _, plan = fit_profile(open_model_folder(sparse_release), tier, tier.default_preset, int(tier.min_vram_gib * GiB))
    assert plan.preset == "204x544x992"
    assert plan.peak_vram_bytes <= TARGETS[profile] * GiB, plan
    assert set(plan.phases) == {"text", "denoise", "decode", "write"}
    host_budget = _host_budget(profile)
    assert all(p.peak_host_bytes <= host_budget for p in plan.phases.values()), plan


@pytest.mark.slow
def test_full_size_dry_run(sparse_release):
    plan, seconds = _dry_run(sparse_release, "24gb")
    assert plan["preset"] == "204x544x992" and set(plan["phases"]) == {"text", "denoise", "decode", "write"}
    assert plan["peak_vram_bytes"] <= TARGETS["24gb"] * GiB, plan
    assert seconds < 120


def _host_budget(profile: str) -> int:
    from lowvram_stepvideo.profiles import load_profile
    return int(load_profile(profile).memory.host_ram_gb * GiB)


def test_plan_grows_with_the_preset_and_counts_weights(sparse_release):
    from lowvram_stepvideo.loading.model_folder import open_model_folder
    from lowvram_stepvideo.planning.plan import plan_memory
    from lowvram_stepvideo.profiles import Preset, load_profile, with_overrides
    folder = open_model_folder(sparse_release)
    profile = with_overrides(load_profile("12gb"), dit_resident_blocks=0)
    small = plan_memory(folder, profile, Preset(17, 272, 496, 1))
    large = plan_memory(folder, profile, Preset(51, 544, 992, 1))
    assert large.phases["denoise"].peak_vram_bytes > small.phases["denoise"].peak_vram_bytes
    # the streamed DiT holds its top-level weights and prefetch + 1 bf16 blocks (1.2 GB each) at least
    assert small.phases["denoise"].peak_vram_bytes > 3 * 1.2e9
    more = plan_memory(folder, with_overrides(profile, dit_resident_blocks=2), Preset(17, 272, 496, 1))
    grown = more.phases["denoise"].peak_vram_bytes - small.phases["denoise"].peak_vram_bytes
    assert abs(grown - 2 * 604_041_728 * 2) < 0.01 * grown    # two more bf16 blocks resident


def test_plan_matches_a_measured_cpu_run(tmp_path, monkeypatch):
    """The plan (fake tensors, 'meta' as the device) against the same run on real tensors, counted by the same
    accountant, which sees what operators allocate: activations, and weights a loader builds (the DiT's), not the
    weights a CPU run reads from the memory map. So per phase the measured peak lies between the planned
    activations and the plan's total (activations + weights); the text encoders and the VAE are loaded as stored
    (nothing built), so there it is the planned activations. Host RSS against the plan: bench/host_memory.py."""
    import torch

    from lowvram_stepvideo.planning import plan as plan_mod
    from lowvram_stepvideo.defaults import DEMO_PRESET
    from lowvram_stepvideo.loading.demo import build_demo_model
    from lowvram_stepvideo.planning.byte_count import ByteAccountant
    from lowvram_stepvideo.loading.model_folder import open_model_folder
    from lowvram_stepvideo.pipeline.phases import PhasePipeline
    from lowvram_stepvideo.profiles import load_profile
    monkeypatch.setenv("LOWVRAM_STEPVIDEO_CACHE", str(tmp_path))
    folder, profile = open_model_folder(build_demo_model()), load_profile("cpu")
    plan = plan_mod.plan_memory(folder, profile, DEMO_PRESET)
    activations = {name: max(s.device_bytes + s.host_bytes for s in stretches)
                   for name, stretches in plan_mod.trace(folder, profile, DEMO_PRESET).items()}
    acc, measured = ByteAccountant(), {}
    pipe = PhasePipeline(folder, profile, progress=False, log=lambda msg: None)
    pipe.runtime.phase_listeners.append(lambda name, event: acc.reset_peak() if event == "start" else
                                        measured.__setitem__(name, acc.peak["cpu"]))
    with acc, torch.inference_mode():
        pipe(prompt="a cat", num_frames=DEMO_PRESET.frames, height=DEMO_PRESET.height, width=DEMO_PRESET.width,
             num_inference_steps=1, output_type="video")
    for name in activations:                            # the traced phases (the mp4 writer's is estimated)
        phase = plan.phases[name]
        total = phase.peak_vram_bytes + phase.peak_host_bytes
        assert 0.99 * activations[name] <= measured[name] <= total, (name, activations[name], measured[name], total)
    for name in ("text", "decode"):
        assert abs(activations[name] - measured[name]) <= 0.02 * measured[name], (name, activations, measured)


def test_fit_to_card_starts_the_ladder_at_the_largest_preset_that_fits(tmp_path, monkeypatch):
    from lowvram_stepvideo.loading.demo import build_demo_model
    from lowvram_stepvideo.loading.model_folder import open_model_folder
    from lowvram_stepvideo.pipeline.phases import PhasePipeline
    from lowvram_stepvideo.planning.plan import plan_memory
    from lowvram_stepvideo.profiles import Preset, load_profile
    from lowvram_stepvideo.planning.budgets import HOST_MARGIN_MIN
    from lowvram_stepvideo.run.ladder import fit_to_card
    monkeypatch.setenv("LOWVRAM_STEPVIDEO_CACHE", str(tmp_path))
    folder, profile = open_model_folder(build_demo_model()), load_profile("cpu")
    ladder = [Preset(68, 128, 192, 1), Preset(34, 64, 96, 1), Preset(17, 32, 48, 1)]
    plans = [plan_memory(folder, profile, p) for p in ladder]
    peaks = [max(q.peak_vram_bytes + q.peak_host_bytes for q in plan.phases.values()) for plan in plans]
    assert peaks[0] > peaks[1] > peaks[2]                 # on the cpu, compute and host copies share the RAM
    ram = (peaks[0] + peaks[1]) // 2 + HOST_MARGIN_MIN     # the first does not fit the RAM budget, the second does
    said = []
    pipe = PhasePipeline(folder, profile, progress=False, log=said.append)
    assert fit_to_card(pipe, ladder, None, said.append, ram_bytes=ram)[0] == ladder[1:]
    assert any("does not fit" in line for line in said)
    assert fit_to_card(pipe, ladder, None, said.append, ram_bytes=peaks[0] + HOST_MARGIN_MIN)[0] == ladder


def test_plans_are_kept_on_disk_per_folder_identity(demo_dir, tmp_path, monkeypatch):
    """A second process plans from the disk without tracing; a damaged entry, or a file of the folder replaced
    (seen by a running process too), is traced again; a cache folder that cannot be written only makes planning
    slower."""
    from lowvram_stepvideo.planning import plan
    from lowvram_stepvideo.defaults import DEMO_PRESET
    from lowvram_stepvideo.loading.model_folder import open_model_folder
    from lowvram_stepvideo.profiles import load_profile
    cache = tmp_path / "cache"
    monkeypatch.setenv("LOWVRAM_STEPVIDEO_CACHE", str(cache))
    folder = open_model_folder(link_tree(demo_dir, tmp_path / "model"))
    profile = load_profile("12gb")
    traced, original = [], plan._traced
    monkeypatch.setattr(plan, "_traced", lambda *a, **kw: traced.append(1) or original(*a, **kw))

    def plan_anew() -> dict:
        monkeypatch.setattr(plan, "_TRACES", {})            # as a new process starts
        p = plan.plan_memory(folder, profile, DEMO_PRESET)
        return {name: (ph.peak_vram_bytes, ph.peak_host_bytes) for name, ph in p.phases.items()}

    first = plan_anew()
    entries = sorted((cache / "plans").glob("*.json"))
    assert traced == [1] and len(entries) == 2              # text + denoise, and decode
    assert plan_anew() == first and traced == [1]
    entries[0].write_text('{"key": "damaged"')
    assert plan_anew() == first and len(traced) == 2
    config = tmp_path / "model" / "vae" / "config.json"
    text = config.read_text()
    config.unlink()                                          # a hard link: replace the file, never write into it
    config.write_text(text)
    replanned = plan.plan_memory(folder, profile, DEMO_PRESET)   # in the same process too (the web page's)
    assert replanned.phases == plan.plan_memory(folder, profile, DEMO_PRESET).phases and len(traced) == 3
    assert plan_anew() == first and len(traced) == 3
    assert len(list((cache / "plans").glob("*.json"))) == 4
    cache.rename(tmp_path / "moved")
    cache.write_text("a file where the cache folder should be")
    assert plan_anew() == first and len(traced) == 4
