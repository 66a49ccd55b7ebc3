"""The two runtimes under the same pipeline: the planning runtime's shortcuts (one block per stack, replayed repeat
calls, no full garbage collection) against planning without them, its byte accounting on data-free tensors, and
fitting, assume_format and the DeviceRuntime's placement per profile section."""
import gc
from dataclasses import replace

import pytest
import torch

from lowvram_stepvideo.loading import loaders
from lowvram_stepvideo.planning import plan, planned_models, planning_machine
from lowvram_stepvideo.engines import step_cache
from lowvram_stepvideo.defaults import DEMO_PRESET
from lowvram_stepvideo.planning.byte_count import DEVICE, HOST, PlanningAccountant
from lowvram_stepvideo.loading.model_folder import open_model_folder
from lowvram_stepvideo.engines.parallel import Layout
from lowvram_stepvideo.profiles import Preset, load_profile, with_overrides
from lowvram_stepvideo.defaults import SpeedOptions

MiB = 2**20


@pytest.fixture
def folder(demo_dir):
    return open_model_folder(demo_dir)


@pytest.fixture(autouse=True)
def fresh_traces(monkeypatch):
    """Every plan here is traced: nothing from this process's earlier tests or from the disk cache."""
    monkeypatch.setattr(plan, "_TRACES", {})
    monkeypatch.setattr(plan, "disk_cache", lambda: None)


def _peaks(p: plan.Plan) -> dict:
    return {name: (ph.peak_vram_bytes, ph.peak_host_bytes) for name, ph in p.phases.items()}


@pytest.mark.parametrize("options", [None, SpeedOptions(cache=0.05)], ids=["plain", "step-cache"])
def test_planning_shortcuts_do_not_change_the_plan(folder, monkeypatch, options):
    """One block per stack, repeat calls replayed (sequential CFG, VAE tiles of one shape) and no full collection
    at phase ends plan exactly what the plain way does: every block built, every call computed. With the step
    cache, the DiT has 4 blocks (the demo's 2 do not show what blocks 2..N-1 hold), and planning more steps, every
    evaluation in full (the most the cache holds), needs no more device memory."""
    profile = with_overrides(load_profile("12gb"), cfg_mode="sequential", vae_tile=2, vae_overlap=0,
                             token_chunk=16, attention_head_chunk=1, dit_resident_blocks=1)
    preset = Preset(17, 32, 48, 1)                   # latents 3 x 2 x 3: two 2 x 2 tiles
    if options:
        monkeypatch.setattr(loaders, "_layers", lambda config, layers:
                            config if layers is None else replace(config, num_layers=min(layers, 4)))
    fast = _peaks(plan.plan_memory(folder, profile, preset, options=options))
    monkeypatch.setattr(plan, "_TRACES", {})
    monkeypatch.setattr(planning_machine, "PLANNED_BLOCKS", 1000)
    monkeypatch.setattr(planning_machine, "REPLAYED", ())
    monkeypatch.setattr(planning_machine.PlanningRuntime, "free", lambda self: gc.collect())
    plain = _peaks(plan.plan_memory(folder, profile, preset, options=options))
    assert fast == plain
    assert fast["decode"][0] > 0 and fast["denoise"][0] > fast["text"][0] > 0
    if options:                 # the schedule staged on the device has the extra step's sigma (4 bytes) more
        monkeypatch.setattr(plan, "_TRACES", {})
        monkeypatch.setattr(plan, "CACHED_STEPS", 3)
        monkeypatch.setattr(step_cache.FirstBlockCache, "_can_reuse", lambda self, state, residual: False)
        longer = plan.plan_memory(folder, profile, preset, options=options)
        assert longer.phases["denoise"].peak_vram_bytes == fast["denoise"][0] + 4


@pytest.mark.parametrize("options, layout", [(None, None), (SpeedOptions(cache=0.05), None), (None, Layout(4, 0, 2, 2))],
                         ids=["plain", "step-cache", "cfg-x-sequence-rank"])
def test_a_decode_traced_alone_plans_what_a_whole_run_does(folder, monkeypatch, options, layout):
    """Trying another VAE tile (the untiled check) traces the decode after a denoise of no steps, reusing the
    traced text and denoise: the same plan as tracing the whole run with that tile (also for a parallel rank)."""
    cfg_mode = "batch" if layout else "sequential"   # as a CFG-parallel run has it
    tiled = with_overrides(load_profile("12gb"), cfg_mode=cfg_mode, vae_tile=2, vae_overlap=0)
    untiled = with_overrides(tiled, vae_tile=0, vae_overlap=0)
    preset = Preset(17, 32, 48, 1)

    def peaks(profile) -> dict:
        return _peaks(plan.evaluate(plan.trace(folder, profile, preset, None, options, layout), profile, preset))
    peaks(tiled)
    traced, original = [], plan._traced
    monkeypatch.setattr(plan, "_traced", lambda *a, **kw: traced.append(kw) or original(*a, **kw))
    alone = peaks(untiled)
    assert traced == [{"denoise": False}]
    monkeypatch.setattr(plan, "_TRACES", {})
    whole = peaks(untiled)
    assert traced[1:] == [{"denoise": True}] and alone == whole
    assert whole["decode"] != peaks(tiled)["decode"]


def test_plan_follows_the_settings_that_shape_activations(folder):
    profile = load_profile("12gb")
    batch = plan.plan_memory(folder, with_overrides(profile, cfg_mode="batch"), DEMO_PRESET)
    sequential = plan.plan_memory(folder, with_overrides(profile, cfg_mode="sequential"), DEMO_PRESET)
    assert batch.phases["denoise"].peak_vram_bytes > sequential.phases["denoise"].peak_vram_bytes
    assert batch.phases["decode"] == sequential.phases["decode"] and batch.phases["text"] == sequential.phases["text"]


def test_fit_profile_keeps_the_most_resident_blocks_that_fit(folder):
    profile = with_overrides(load_profile("12gb"), presets=[DEMO_PRESET], dit_prefetch=0, dit_resident_blocks=2)
    peaks = [plan.plan_memory(folder, with_overrides(profile, dit_resident_blocks=r), DEMO_PRESET)
             .phases["denoise"].peak_vram_bytes for r in range(3)]    # the demo DiT has 2 blocks
    assert peaks[0] < peaks[1]
    for budget in sorted(set(peaks)):
        fitted, fitted_plan = plan.fit_profile(folder, profile, DEMO_PRESET, budget)
        most = max(r for r in range(3) if peaks[r] <= budget)
        assert fitted.dit.resident_blocks == most and fitted_plan.phases["denoise"].peak_vram_bytes == peaks[most]
    fitted, _ = plan.fit_profile(folder, profile, DEMO_PRESET, peaks[0] - 1)       # nothing fits: all streamed
    assert fitted.dit.resident_blocks == 0


def test_fit_profile_streams_step_llm_that_does_not_fit_whole(folder):
    profile = with_overrides(load_profile("48gb"), presets=[DEMO_PRESET])
    whole = plan.plan_memory(folder, profile, DEMO_PRESET).phases["text"].peak_vram_bytes
    fitted, fitted_plan = plan.fit_profile(folder, profile, DEMO_PRESET, whole - 1)
    assert fitted.text_encoders.placement == "stream"
    assert _peaks(fitted_plan) == _peaks(plan.plan_memory(folder, fitted, DEMO_PRESET))


def test_tables_read_in_place_count_only_where_they_are_copied(folder):
    """A CPU run that loads an embedding table as stored reads it from the memory map, only the rows it looks up;
    a cast, or a GPU, copies it whole. (bench/host_memory.py measures the difference: 0.75 GiB for step_llm.)"""
    llm, kept = planned_models.planned_model(folder, "step_llm", torch.bfloat16)   # the demo stores bf16
    _, cast = planned_models.planned_model(folder, "step_llm", torch.float32)
    table = sum(m.weight.nbytes for m in llm.modules() if isinstance(m, torch.nn.Embedding))
    assert kept.mapped_table_bytes == table > 0 and cast.mapped_table_bytes == 0
    assert plan.footprint(kept, None, load_profile("cpu")) == (kept.total_bytes - table, 0)
    assert plan.footprint(kept, None, load_profile("12gb")) == (kept.total_bytes, 0)


def test_assume_format_plans_like_the_quantized_folder(folder, tmp_path):
    from lowvram_stepvideo.tools.quantize_folder import quantize_folder
    quantize_folder(folder.root, tmp_path / "int8", "int8", log=lambda msg: None)
    profile = load_profile("12gb")
    quantized = plan.plan_memory(open_model_folder(tmp_path / "int8"), profile, DEMO_PRESET)
    assumed = plan.plan_memory(folder, profile, DEMO_PRESET, assume_format="int8")
    release = plan.plan_memory(folder, profile, DEMO_PRESET)
    assert _peaks(assumed) == _peaks(quantized)
    assert assumed.phases["text"].peak_vram_bytes < release.phases["text"].peak_vram_bytes
    assert assumed.phases["denoise"].peak_vram_bytes < release.phases["denoise"].peak_vram_bytes


def test_full_size_plan_is_the_same_whatever_the_preset_order(folder):
    """Traces are cached per preset: planning a second preset does not disturb the first."""
    profile = load_profile("12gb")
    small, large = Preset(17, 32, 48, 1), DEMO_PRESET
    first = _peaks(plan.plan_memory(folder, profile, large))
    plan.plan_memory(folder, profile, small)
    assert _peaks(plan.plan_memory(folder, profile, large)) == first


# ---------------------------------------------------------------- accounting on data-free tensors

def test_planning_accountant_counts_moves_between_host_and_device():
    acc, device = PlanningAccountant(), torch.device(DEVICE, 0)
    with acc, torch.inference_mode():
        host = torch.zeros(MiB // 4)                       # float32: 1 MiB in host RAM
        ids = torch.tensor([[1, 2, 3]])                    # real data made into a stand-in
        noise = torch.randn(MiB // 4, generator=torch.Generator().manual_seed(0))
        assert (acc.live[HOST], acc.live[DEVICE]) == (2 * MiB + ids.nbytes, 0)
        up = host.to(device)
        again = up.to(device)                              # already there: no copy
        assert acc.live[DEVICE] == MiB and again.untyped_storage()._cdata == up.untyped_storage()._cdata
        doubled = up * 2                                   # computed where its input is
        back = doubled.cpu()
        half = up.to(torch.bfloat16)
        assert acc.live[DEVICE] == 2 * MiB + MiB // 2 and acc.live[HOST] == 3 * MiB + ids.nbytes
        del doubled, half, again, up
        assert acc.live[DEVICE] == 0 and acc.peak[DEVICE] == 2 * MiB + MiB // 2
        assert all(t.device.type == "meta" for t in (host, ids, noise, back))


def test_planning_accountant_refuses_what_needs_data():
    with PlanningAccountant():
        x = torch.ones(3, device=torch.device(DEVICE, 0))
        with pytest.raises(Exception):
            x.sum().item()


# ---------------------------------------------------------------- the real runtime

def test_device_runtime_places_per_profile_section(folder):
    from lowvram_stepvideo.engines.attach import attached
    from lowvram_stepvideo.pipeline.machine import DeviceRuntime
    profile = with_overrides(load_profile("cpu"), dit_resident_blocks=1, dit_prefetch=0, dit_source="ram",
                             text_encoders_placement="device")
    runtime = DeviceRuntime(folder, profile, log=lambda msg: None)
    dit = runtime.load("transformer", torch.float32)
    with runtime.placed(dit, "dit"):
        assert attached(dit) == ["streaming"]                  # 1 of 2 blocks resident: streamed
    assert attached(dit) == []
    llm = runtime.load("step_llm", torch.float32)
    with runtime.placed(llm, "text_encoders"):
        assert attached(llm) == ["placement"]                  # placement "device": whole
