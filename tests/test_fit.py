"""The verdict (fit.py, budgets.py, --dry-run): budgets, the ladder walk, what fitting lowers, the suggested profile,
auto by VRAM and RAM, --assume-format, exit codes and JSON, and the 8gb profile at full size.

The ladder/lowering logic runs against a synthetic plan (bytes as simple functions of the layout, so every budget
boundary is known exactly); the CLI, --assume-format and the 8gb check run the real planner."""
import json
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest

from cli_support import run_cli
from lowvram_stepvideo.planning import budgets, fit, stacks
from lowvram_stepvideo.planning.budgets import GiB, Budget, host_budget, machine_budget, vram_budget
from lowvram_stepvideo.engines.streaming import ARENA_BYTES
from lowvram_stepvideo.engines.host_store import HostArenas
from lowvram_stepvideo.planning.plan import PhasePlan, Plan
from lowvram_stepvideo.profiles import Preset, load_profile, with_overrides
from lowvram_stepvideo.planning.budgets import auto_choice, auto_profile
from sparse_release import write_sparse_release

MiB = 2**20
BLOCK, BLOCKS = 64 * MiB, 10            # synthetic DiT: 10 blocks of 64 MiB (a power of two: arenas cost n x BLOCK)
LADDER = [Preset(f, 64, 96, 1) for f in (136, 102, 68, 51, 34, 17)]


def synthetic_plan(profile, preset) -> Plan:
    """Device: activations (tokens x token_chunk / 64 bytes) + resident blocks + slots; host: packed copies."""
    dit = profile.dit
    resident = min(dit.resident_blocks, BLOCKS)
    streamed = BLOCKS - resident
    slots = min(dit.prefetch + 1, streamed)
    arenas = HostArenas(BLOCK, ARENA_BYTES, pin=False)           # packed copies as the engine allocates them
    packed = arenas.cost(arenas.fit(int(profile.memory.packed_gb * GiB), streamed)) if dit.source == "ram" else 0
    act = preset.tokens * profile.token_chunk // 64
    return Plan(profile.name, str(preset), {"text": PhasePlan(BLOCK, 0),
                                            "denoise": PhasePlan(act + (resident + slots) * BLOCK, packed),
                                            "decode": PhasePlan(act, act // 4)})


def synthetic_fit_profile(folder, profile, preset, budget_bytes, options=None, layout=None, capability=None):
    """plan.fit_profile's contract: resident blocks lowered until the denoise peak fits, never raised."""
    for r in range(profile.dit.resident_blocks, -1, -1):
        fitted = replace(profile, dit=replace(profile.dit, resident_blocks=r))
        plan = synthetic_plan(fitted, preset)
        if plan.phases["denoise"].peak_vram_bytes <= budget_bytes:
            break
    synthetic_fit_profile.calls += 1
    return fitted, plan


@pytest.fixture
def synthetic(monkeypatch):
    synthetic_fit_profile.calls = 0
    monkeypatch.setattr(fit, "fit_profile", synthetic_fit_profile)
    monkeypatch.setattr(stacks, "stack_size", lambda folder, component, dtype: (BLOCKS, BLOCK))
    return SimpleNamespace(weight_format="int8")       # a folder: only its format is looked at


def profile_24gb():
    return with_overrides(load_profile("24gb"), presets=LADDER)


def cuda_budget(vram: int, host: int = 100 * GiB) -> Budget:
    return Budget("cuda", vram, host, "test", "test")


def peak(profile, preset) -> int:
    return synthetic_plan(profile, preset).peak_vram_bytes


# ---- budgets ------------------------------------------------------------------------------------------------

def test_budgets_of_a_given_machine():
    assert abs(vram_budget(8 * GiB)[0] - 7.2 * GiB) < MiB           # 0.5 GiB context + 0.3 GiB reserve
    assert abs(vram_budget(24 * GiB)[0] - (24 - 0.5 - 0.72) * GiB) < MiB   # reserve 3% above 10 GiB
    assert host_budget(16 * GiB)[0] == 14 * GiB                     # 2 GiB for the OS
    assert abs(host_budget(64 * GiB)[0] - 0.9 * 64 * GiB) < 2           # 10% above 20 GiB
    cpu = machine_budget("cpu", None, 32 * GiB)
    assert cpu.vram_bytes == cpu.host_bytes == host_budget(32 * GiB)[0]
    assert cpu.phase_fits(cpu.host_bytes // 2, cpu.host_bytes // 2) and not cpu.phase_fits(cpu.host_bytes, 1)


def test_budget_of_this_machine(monkeypatch):
    monkeypatch.setattr(budgets, "available_ram_bytes", lambda: 10 * GiB)
    monkeypatch.setattr(budgets, "cuda_free_and_total", lambda: (5 * GiB, 8 * GiB))
    b = machine_budget("cuda")
    assert b.host_bytes == 9 * GiB and "available" in b.host_from
    assert abs(b.vram_bytes - 4.7 * GiB) < MiB and "5.0 GiB free of 8.0 GiB" in b.vram_from   # context already out
    monkeypatch.setattr(budgets, "cuda_free_and_total", lambda: None)
    nominal = machine_budget("cuda", nominal_vram_bytes=12 * GiB)
    assert nominal.vram_bytes == vram_budget(12 * GiB)[0] and "no CUDA device" in nominal.vram_from


def test_expandable_segments_unless_the_user_chose(monkeypatch):
    monkeypatch.setattr(budgets.sys, "platform", "linux")
    monkeypatch.delenv(budgets.ALLOC_CONF, raising=False)
    budgets.use_expandable_segments()
    assert budgets.os.environ[budgets.ALLOC_CONF] == "expandable_segments:True"
    monkeypatch.setenv(budgets.ALLOC_CONF, "max_split_size_mb:128")
    budgets.use_expandable_segments()
    assert budgets.os.environ[budgets.ALLOC_CONF] == "max_split_size_mb:128"


# ---- the ladder and the layout ------------------------------------------------------------------------------

def test_the_largest_fitting_preset_is_found_by_bisection(synthetic):
    profile = profile_24gb()
    floor = with_overrides(profile, dit_resident_blocks=0)      # the least each preset can take
    peaks = [peak(floor, p) for p in LADDER]
    for expected in range(len(LADDER)):
        synthetic_fit_profile.calls = 0
        budget = cuda_budget(peaks[expected])
        found = fit.first_fit(synthetic, profile, LADDER, budget)
        linear = next(i for i, p in enumerate(LADDER) if peak(floor, p) <= budget.vram_bytes)
        assert found == linear == expected
        # the bisection, and one more plan of the preset found with an untiled VAE decode
        assert synthetic_fit_profile.calls <= 3 + math.ceil(math.log2(len(LADDER)))
    assert fit.first_fit(synthetic, profile, LADDER, cuda_budget(peaks[-1] - 1)) is None


def test_resident_blocks_then_packed_ram_are_lowered_to_fit(synthetic):
    profile = profile_24gb()                                    # 12 resident (of 10: all), 32 GiB packed
    preset = LADDER[0]
    room = peak(with_overrides(profile, dit_resident_blocks=4), preset)
    verdict = fit.check_fit(synthetic, profile, preset, *_machine(room, host=4 * BLOCK))
    assert verdict.fits and verdict.preset == preset and verdict.requested_plan is None
    assert verdict.profile.dit.resident_blocks == 4             # 6 streamed, of which 4 fit the host budget
    assert stacks.packed_blocks(synthetic, verdict.profile, "dit") == 4 and verdict.profile.dit.source == "ram"
    d = verdict.to_dict()
    assert d["layout"]["dit"] == {"blocks": 10, "resident": 4, "packed_in_ram": 4, "from_disk": 2, "prefetch": 2}
    assert "fitted: DiT resident blocks 10 -> 4; packed RAM 32 -> 0.2 GiB" in verdict.report()
    no_room = fit.check_fit(synthetic, profile, preset, *_machine(room, host=BLOCK - 1))
    assert no_room.fits and no_room.profile.dit.source == "disk" and no_room.profile.memory.packed_gb == 0


def _machine(vram_budget_bytes: int, host: int) -> tuple[int, int]:
    """(card bytes, RAM bytes) whose budgets (budgets.py) are these."""
    card = vram_budget_bytes + budgets.CUDA_CONTEXT_BYTES + budgets.VRAM_RESERVE_MIN    # below 10 GiB: fixed reserve
    assert vram_budget(card)[0] == vram_budget_bytes
    return card, host + budgets.HOST_MARGIN_MIN


def test_a_smaller_preset_is_named_when_the_requested_one_does_not_fit(synthetic):
    profile = profile_24gb()
    floor = with_overrides(profile, dit_resident_blocks=0)
    verdict = fit.check_fit(synthetic, profile, LADDER[0], *_machine(peak(floor, LADDER[2]), host=GiB))
    assert verdict.fits and verdict.preset == LADDER[2] and verdict.requested_plan is not None
    d = verdict.to_dict()
    assert (d["fits"], d["preset"], d["requested_preset"]) == (True, str(LADDER[2]), str(LADDER[0]))
    assert f"verdict: {LADDER[0]} does not fit" in verdict.report()
    assert f"the largest preset that does is {LADDER[2]}" in verdict.report()


def test_when_nothing_fits_a_smaller_profile_is_named(synthetic):
    profile = profile_24gb()                                    # token_chunk 16384; the 8gb profile runs 4096
    small = with_overrides(load_profile("8gb"), presets=LADDER)
    budget = peak(with_overrides(small, dit_resident_blocks=0), LADDER[0])
    assert peak(with_overrides(profile, dit_resident_blocks=0), LADDER[-1]) > budget
    verdict = fit.check_fit(synthetic, profile, LADDER[0], *_machine(budget, host=GiB))
    assert not verdict.fits and verdict.preset is None
    assert (verdict.suggested_profile, verdict.suggested_preset) == ("8gb", LADDER[0])
    d = verdict.to_dict()
    assert d["fits"] is False and d["preset"] is None and d["suggested_profile"] == "8gb"
    assert "verdict: does not fit" in verdict.report() and "profile 8gb would, at 136x64x96" in verdict.report()


def test_on_the_cpu_device_and_host_share_the_ram(synthetic):
    profile = with_overrides(load_profile("cpu"), presets=LADDER, dit_prefetch=0, memory_packed_gb=2 * BLOCK / GiB)
    preset = LADDER[0]                                          # resident r < 10 holds r + 1 + min(2, 10 - r) blocks
    best = synthetic_plan(with_overrides(profile, dit_resident_blocks=5), preset)   # 8 of 10 (all resident: 10)
    total = max(p.peak_vram_bytes + p.peak_host_bytes for p in best.phases.values())
    verdict = fit.check_fit(synthetic, profile, preset, None, total + budgets.HOST_MARGIN_MIN)
    assert verdict.fits and verdict.profile.dit.resident_blocks == 5
    assert "RAM" in verdict.report().splitlines()[1] and "VRAM" not in verdict.report()
    assert verdict.to_dict()["budget_vram_bytes"] == verdict.to_dict()["budget_host_bytes"] == total


def test_a_real_run_says_what_fitting_lowered(synthetic):
    from lowvram_stepvideo.run.ladder import fit_to_card
    profile = profile_24gb()
    card, ram = _machine(peak(with_overrides(profile, dit_resident_blocks=3), LADDER[0]), host=2 * BLOCK)
    pipe, said = SimpleNamespace(folder=synthetic, profile=profile, options=None), []
    ladder, fitted = fit_to_card(pipe, LADDER, card, said.append, ram_bytes=ram)
    assert ladder == LADDER and pipe.profile is profile                      # the pipeline is left as it is
    assert fitted.dit.resident_blocks == 3 and stacks.packed_blocks(synthetic, fitted, "dit") == 2
    assert "plan: DiT resident blocks lowered from 10 to 3 to fit" in said
    assert any(line.startswith("plan: packed host RAM lowered from 32 to 0.1 GiB") for line in said), said


def test_a_rank_of_a_parallel_run_plans_with_its_share_of_the_ram(synthetic, monkeypatch):
    """Two processes on one machine (torchrun's LOCAL_WORLD_SIZE 2) each pack their own blocks: each plans with half
    the RAM, so what fits one process alone packs fewer blocks in each of two."""
    from lowvram_stepvideo.engines.parallel import layout_for
    from lowvram_stepvideo.run.ladder import fit_to_card
    profile = profile_24gb()
    card, ram = _machine(peak(with_overrides(profile, dit_resident_blocks=3), LADDER[0]), host=4 * BLOCK)
    pipe = SimpleNamespace(folder=synthetic, profile=profile, options=None)
    alone = fit_to_card(pipe, LADDER, card, lambda line: None, ram_bytes=ram)[1]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    said = []
    shared = fit_to_card(pipe, LADDER, card, said.append, ram_bytes=ram, layout=layout_for("sequence", 2))[1]
    assert stacks.packed_blocks(synthetic, shared, "dit") < stacks.packed_blocks(synthetic, alone, "dit")
    assert any("shared by 2 processes" in line for line in said), said


# ---- the command line ---------------------------------------------------------------------------------------

KEYS = {"fits", "preset", "profile", "budget_vram_bytes", "budget_host_bytes", "peak_vram_bytes", "peak_host_bytes",
        "phases"}


@pytest.mark.slow
@pytest.mark.usefixtures("demo_env", "one_torch_thread")
def test_dry_run_exit_codes_and_json(capsys):
    rc, out, err = run_cli(capsys, "--demo", "--prompt", "a fox", "--dry-run", "--json", "--ram-gib", "8")
    d = json.loads(out)
    assert rc == 0 and d["fits"] is True and KEYS <= set(d), (rc, err)
    assert d["preset"] == "34x64x96" and d["profile"] == "cpu" and d["budget_host_bytes"] == 6 * GiB
    assert set(d["phases"]) == {"text", "denoise", "decode", "write"}
    assert all(set(p) == {"peak_vram_bytes", "peak_host_bytes"} for p in d["phases"].values())
    rc, out, err = run_cli(capsys, "--demo", "--prompt", "a fox", "--dry-run", "--ram-gib", "2.01")
    assert rc == 3, err
    assert out.splitlines()[-1].startswith("verdict: does not fit in ") and "total" in out


@pytest.mark.usefixtures("demo_env")
@pytest.mark.parametrize("argv, says", [
    (["--vram-gib", "8"], "--vram-gib only goes with --dry-run"),
    (["--assume-format", "int8"], "--assume-format only goes with --dry-run"),
    (["--dry-run", "--ram-gib", "0"], "--ram-gib 0: give the memory in GiB, e.g. 12 or 31.5"),
])
def test_dry_run_flags_are_checked(capsys, argv, says):
    rc, out, err = run_cli(capsys, "--demo", "--prompt", "a fox", *argv)
    assert (rc, err) == (2, f"error: {says}")


@pytest.mark.usefixtures("demo_env")
def test_a_lowered_resident_blocks_override_is_said(capsys, synthetic):
    profile = profile_24gb()
    room = peak(with_overrides(profile, dit_resident_blocks=3), Preset(34, 64, 96, 4))
    card, ram = _machine(room, host=GiB)
    rc, out, err = run_cli(capsys, "--demo", "--profile", "24gb", "--prompt", "a fox", "--dry-run", "--resident-blocks",
                           "9", "--vram-gib", card / GiB, "--ram-gib", ram / GiB)
    assert rc == 0 and "note: --resident-blocks 9 lowered to 3" in err, err
    assert "DiT resident blocks 9 -> 3" in out


# ---- auto ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vram_gib, ram_gib, name", [
    (None, 64, "cpu"), (None, 23, "cpu-lowram"), (None, 8, "cpu-lowram"),
    (7.6, 16, "8gb"), (6.0, 16, "8gb"), (11.7, 32, "12gb"), (23.6, 64, "24gb"), (23.6, 32, "24gb"),
])
def test_auto_picks_by_vram_and_ram(vram_gib, ram_gib, name):
    vram = None if vram_gib is None else int(vram_gib * GiB)
    profile, reason = auto_choice(vram, int(ram_gib * GiB))
    assert profile.name == name and reason.startswith(f"auto: {name}")
    assert profile.memory.host_ram_gb * GiB <= host_budget(ram_gib * GiB)[0] or name == "cpu-lowram"
    assert auto_profile(vram, int(ram_gib * GiB)) == profile


def test_auto_scales_a_tiers_host_ram_to_a_small_machine():
    profile, reason = auto_choice(int(23.6 * GiB), 32 * GiB)            # a 24 GB card in a 32 GB machine
    tier = load_profile("24gb")
    assert profile.memory.host_ram_gb <= 28.8 < tier.memory.host_ram_gb
    assert 0 < profile.memory.packed_gb < tier.memory.packed_gb and profile.dit == tier.dit
    assert "exceed this machine's 28.8 GiB" in reason and "read from disk" in reason
    assert auto_profile(int(23.6 * GiB), 64 * GiB) == tier                # 64 GB: the tier as written


def test_a_machine_that_holds_the_decode_but_not_the_mp4_writer_is_told(demo_dir):
    """Writing the mp4 is a phase of the plan: the uint8 frames and the ffmpeg process come on top of the decoded
    video (video.py's estimates, measured in tests/test_video.py)."""
    from lowvram_stepvideo.defaults import DEMO_PRESET
    from lowvram_stepvideo.loading.model_folder import open_model_folder
    folder, profile = open_model_folder(demo_dir), load_profile("12gb")
    plan = fit.check_fit(folder, profile, DEMO_PRESET, 8 * GiB, 64 * GiB).plan
    write, decode = plan.phases["write"], plan.phases["decode"]
    assert write.peak_host_bytes > decode.peak_host_bytes + 200 * 2**20       # ffmpeg's own 256 MiB at least
    holds_decode_only = (decode.peak_host_bytes + write.peak_host_bytes) // 2 + 2 * GiB   # RAM - 2 GiB margin
    verdict = fit.check_fit(folder, profile, DEMO_PRESET, 8 * GiB, holds_decode_only)
    assert not verdict.fits and not verdict.budget.phase_fits(0, write.peak_host_bytes)
    assert fit.check_fit(folder, profile, DEMO_PRESET, 8 * GiB, write.peak_host_bytes + 2 * GiB + 2**20).fits


# ---- --assume-format ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_assumed_int8_plans_like_the_quantized_folder(demo_dir, tmp_path, one_torch_thread):
    from lowvram_stepvideo.planning.assumed_format import assume_format
    from lowvram_stepvideo.defaults import DEMO_PRESET
    from lowvram_stepvideo.loading.model_folder import ModelFolderError, open_model_folder
    from lowvram_stepvideo.planning.plan import plan_memory
    from lowvram_stepvideo.tools.quantize_folder import quantize_folder
    quantize_folder(demo_dir, tmp_path / "int8", "int8", log=lambda m: None)
    release, quantized = open_model_folder(demo_dir), open_model_folder(tmp_path / "int8")
    profile = load_profile("12gb")
    assumed = plan_memory(release, profile, DEMO_PRESET, assume_format="int8")
    assert assumed.phases == plan_memory(quantized, profile, DEMO_PRESET).phases
    assert assumed.phases != plan_memory(release, profile, DEMO_PRESET).phases
    assert stacks.stack_size(assume_format(release, "int8"), "transformer", profile.torch_dtype) == \
        stacks.stack_size(quantized, "transformer", profile.torch_dtype)
    with pytest.raises(ModelFolderError, match="already quantized"):
        assume_format(quantized, "fp8")


# ---- the 8gb profile at full size ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sparse_4_layers(tmp_path_factory):
    """The full-size zero-weight release with 4 DiT blocks and 4 step_llm layers: for the 8gb layout (1 resident
    block, 2 slots) it plans the same device and host bytes as all 48, in a fraction of the time."""
    return write_sparse_release(tmp_path_factory.mktemp("sparse4") / "stepvideo-t2v", layers=4)


@pytest.mark.slow
def test_8gb_fits_the_full_preset_in_8_gib_and_16_gib(sparse_4_layers):
    from lowvram_stepvideo.loading.model_folder import open_model_folder
    profile = load_profile("8gb")
    assert profile.dit.resident_blocks + profile.dit.prefetch + 1 <= 4        # the 4-layer slice plans as 48 would
    verdict = fit.check_fit(open_model_folder(sparse_4_layers), profile, profile.default_preset, 8 * GiB, 16 * GiB,
                            assume_format="int8")
    d = verdict.to_dict()
    assert d["fits"] and d["preset"] == "204x544x992" and d["weight_format"] == "int8", verdict.report()
    assert d["peak_vram_bytes"] <= d["budget_vram_bytes"] <= 7.2 * GiB + MiB
    assert d["peak_host_bytes"] <= d["budget_host_bytes"] == 14 * GiB
    assert d["layout"]["dit"]["from_disk"] == 3 and verdict.profile == profile    # nothing had to be lowered


# ---- bench/plan_vs_gpu.py -----------------------------------------------------------------------------------

def _bench(name: str):
    import importlib.util
    from conftest import ROOT
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_vs_gpu_skips_cleanly_without_cuda(capsys, monkeypatch):
    bench = _bench("plan_vs_gpu")
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    assert bench.main(["--demo"]) == 0
    assert capsys.readouterr().out == "plan_vs_gpu: skipped, no CUDA device (nothing to measure)\n"


@pytest.mark.slow
@pytest.mark.usefixtures("demo_env", "one_torch_thread")
def test_plan_vs_gpu_logic_on_the_cpu(capsys, monkeypatch):
    """The GPU bench's flow with torch.cuda's counters stood in for (the pipeline itself runs on the cpu)."""
    bench = _bench("plan_vs_gpu")
    cuda = bench.torch.cuda
    used = iter(range(10**6))                   # the driver's "in use" grows by 1 MiB per sample
    monkeypatch.setenv(budgets.ALLOC_CONF, "expandable_segments:True")
    for name, fake in {"is_available": lambda: True, "synchronize": lambda: None, "get_device_name": lambda: "fake",
                       "reset_peak_memory_stats": lambda: None, "max_memory_allocated": lambda: 3 * MiB,
                       "max_memory_reserved": lambda: 4 * MiB,
                       "mem_get_info": lambda: (8 * GiB - next(used) * MiB, 8 * GiB)}.items():
        monkeypatch.setattr(cuda, name, fake)
    assert bench.main(["--demo", "--profile", "cpu", "--preset", "17x16x16", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    rows = [ln.split(" | ") for ln in out.splitlines() if ln.startswith(("| text", "| denoise", "| decode"))]
    assert [r[0] for r in rows] == ["| text", "| denoise", "| decode"]
    assert all(r[2] == "0.00" and float(r[5].rstrip(" |")) > 0 for r in rows)    # 3 MiB; the driver grew
    assert "in use after context creation 0.00 GiB" in out and "beyond the plan" in out
