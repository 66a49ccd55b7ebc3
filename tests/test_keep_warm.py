"""The DiT kept warm between videos (issue 17, point 7): an API session, a batch and the job queue (the web page's)
keep the placed DiT when the plan says RAM allows, say so, place it again at least 5x faster (measured by the
runtime's own clock, on the CPU) and give the same video; the plan counts what stays; a parked block stream
resumes without packing anything again (also on the CUDA path, with fake streams)."""
from __future__ import annotations

import pytest
import torch

from lowvram_stepvideo.engines import block_store
from lowvram_stepvideo.engines.placement import attach_streaming, offload_component, park, parked_stream, unpark
from lowvram_stepvideo.engines.streaming import BlockStreamer
from lowvram_stepvideo.face import api
from lowvram_stepvideo.face.job_queue import JobQueue
from lowvram_stepvideo.loading.model_folder import open_model_folder
from lowvram_stepvideo.pipeline.machine import DeviceRuntime
from lowvram_stepvideo.pipeline.warm import KeptDiT
from lowvram_stepvideo.planning import plan as planning, stacks
from lowvram_stepvideo.profiles import Preset, load_profile, with_overrides
from lowvram_stepvideo.run import warm
from lowvram_stepvideo.run.preflight import JobSpec
from test_offload import _run, fake_cuda, load_toy, toy_dir  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZE = dict(num_frames=17, height=16, width=16, num_inference_steps=2)
FASTER = 5


def _placements_ok(kept: KeptDiT, videos: int) -> None:
    """The first placement loaded the DiT, every later one found it kept and took at most a fifth of the time."""
    assert [was_kept for _, was_kept in kept.placements] == [False] + [True] * (videos - 1)
    first = kept.placements[0][0]
    for seconds, _ in kept.placements[1:]:
        assert FASTER * seconds <= first, kept.placements


@pytest.mark.parametrize("overrides", [{}, {"dit_resident_blocks": 0}, {"step_cache": 0.5}],
                         ids=["whole", "streamed", "step-cache"])
def test_an_api_session_keeps_the_dit_and_gives_the_same_video(demo_dir, overrides):
    said = []
    pipe = api.StepVideoPipeline.from_pretrained(demo_dir, profile="cpu", log=said.append, **overrides)
    first = pipe("a heron in the reeds", seed=3, output_type="latent", **SIZE)      # loads the DiT
    second = pipe("a heron in the reeds", seed=3, output_type="latent", **SIZE)     # the kept one
    assert torch.equal(first, second)
    _placements_ok(pipe.kept, 2)
    assert sum(line.startswith("keep warm: the DiT stays in RAM between videos") for line in said) == 1
    assert sum("(kept in RAM from the last video)" in line for line in said) == 1
    assert pipe.kept.model is not None and pipe.kept.parked
    if overrides.get("dit_resident_blocks") == 0:           # the kept stream holds what the plan counts for it
        engine = parked_stream(pipe.kept.model)
        assert engine is not None and engine.footprint().device_bytes == 0
        profile = pipe.profile
        assert engine.footprint().host_bytes == stacks.packed_bytes(pipe.folder, profile, "dit") > 0


def test_generate_many_keeps_the_dit_between_its_videos(demo_dir, tmp_path):
    said = []
    pipe = api.StepVideoPipeline.from_pretrained(demo_dir, profile="cpu", log=said.append)
    report = pipe.generate_many(["an owl at dusk", "a canoe at dawn", "a kite"], tmp_path / "out", seeds=[1],
                                frames=17, height=16, width=16, steps=1)
    assert report.ok
    _placements_ok(pipe.kept, 3)
    assert any("keep warm: the DiT stays in RAM" in line for line in said)


def test_the_job_queue_of_the_web_page_keeps_the_dit(demo_env, tmp_path):
    lines = []
    queue = JobQueue(results_dir=tmp_path, log_line=lines.append)
    base = dict(demo=True, frames=17, height=16, width=16, steps=1, options={"text_cache": False})
    ids = [queue.submit(JobSpec(prompt, seed=seed, **base)) for prompt, seed in (("a lamp", 0), ("a boat", 1))]
    states = [queue.wait(job_id, timeout=300).state for job_id in ids]
    kept = queue.kept
    placements = list(kept.placements)
    queue.close()
    assert states == ["done", "done"]
    kept.placements = placements
    _placements_ok(kept, 2)
    assert kept.model is None                             # dropped when the queue closed
    assert any("keep warm: the DiT stays in RAM" in line for line in lines)


def test_keep_warm_is_off_when_the_plan_says_ram_cannot_hold_it(demo_dir, monkeypatch):
    monkeypatch.setattr(warm, "plan_fits", lambda plan, budget: False)
    said = []
    pipe = api.StepVideoPipeline.from_pretrained(demo_dir, profile="cpu", log=said.append)
    for seed in (0, 1):
        pipe("a heron", seed=seed, output_type="latent", **SIZE)
    assert [was_kept for _, was_kept in pipe.kept.placements] == [False, False]
    assert pipe.kept.model is None
    assert sum(line.startswith("keep warm: off, the plan with the DiT kept") for line in said) == 1


def test_another_dit_drops_the_kept_one(demo_dir):
    folder, kept = open_model_folder(demo_dir), KeptDiT()
    kept.allowed = True
    whole = DeviceRuntime(folder, load_profile("cpu"), log=lambda msg: None, kept=kept)
    dit = whole.load("transformer", torch.float32)
    with whole.placed(dit, "dit"):
        pass
    assert kept.model is dit and kept.parked and all(p.numel() for p in dit.parameters())
    assert whole.load("transformer", torch.float32) is dit                        # the same key: kept
    streamed = DeviceRuntime(folder, with_overrides(load_profile("cpu"), dit_resident_blocks=0), log=lambda m: None,
                             kept=kept)
    other = streamed.load("transformer", torch.float32)
    assert other is not dit and kept.model is other
    assert all(p.numel() == 0 for p in dit.parameters())                          # the old one was dropped


def test_the_plan_counts_what_stays(demo_dir):
    """Every phase but the denoising holds the kept DiT: on a CPU its weights as placed and its packed copies; on
    a GPU profile only the packed copies (its device part is given back)."""
    folder, preset = open_model_folder(demo_dir), Preset(17, 16, 16, 1)
    cuda = with_overrides(load_profile("12gb"), dit_resident_blocks=0, dit_source="ram", memory_packed_gb=1.0)
    cpu_streamed = with_overrides(load_profile("cpu"), dit_resident_blocks=0)
    whole = load_profile("cpu")
    for profile in (whole, cpu_streamed, cuda):
        plain = planning.plan_memory(folder, profile, preset)
        kept = planning.plan_memory(folder, profile, preset, keep_dit=True)
        stays = kept.kept_dit_bytes
        assert stays > 0 and plain.kept_dit_bytes == 0
        assert kept.phases["denoise"] == plain.phases["denoise"]
        for name in plain.phases:
            if name != "denoise":
                assert kept.phases[name].peak_host_bytes == plain.phases[name].peak_host_bytes + stays
                assert kept.phases[name].peak_vram_bytes == plain.phases[name].peak_vram_bytes
        assert "DiT kept between videos" in kept.table()
        packed = stacks.packed_bytes(folder, profile, "dit")
        assert (packed > 0) == (profile is not whole)
        if profile is cuda:
            assert stays == packed
        else:           # measured on the loaded model: the weights placed in RAM (streamed: all but the blocks)
            dit = folder.open("transformer").load(profile.torch_dtype, "cpu")
            weights = sum(t.numel() * t.element_size() for t in [*dit.parameters(), *dit.buffers()])
            if profile is cpu_streamed:
                weights -= sum(t.numel() * t.element_size() for t in dit.transformer_blocks.parameters())
            assert stays == weights + packed


def test_a_parked_stream_resumes_without_packing_again(toy_dir, monkeypatch):
    model = load_toy(toy_dir, 32, 7, torch.float32)
    x = torch.randn(3, 32)
    plain = _run(model, x)
    engine = attach_streaming(model, "cpu", resident=2, prefetch=1, source="ram", pin_budget_bytes=2**30)
    assert torch.equal(_run(model, x), plain)
    arenas = engine.store.arenas
    park(model)
    assert parked_stream(model) is engine and engine.footprint() == (0, engine.store.nbytes)
    monkeypatch.setattr(block_store.BlockStore, "fill", lambda *a: pytest.fail("packed again"))
    unpark(model, "cpu")
    assert engine.attached and engine.store.arenas is arenas
    assert torch.equal(_run(model, x), plain)
    offload_component(model, discard=True)
    assert all(p.numel() == 0 for p in model.parameters())


def test_suspend_and_resume_on_the_cuda_path(toy_dir, fake_cuda):
    model = load_toy(toy_dir, 32, 7, torch.bfloat16)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    plain = _run(model, x)
    engine = BlockStreamer(model.transformer_blocks, "cpu", resident=1, prefetch=2, source="ram",
                           pin_budget_bytes=2**30, weight_refs=model.weight_refs, prefix="transformer_blocks.")
    engine.cuda = True                   # every CUDA code path, with the fake streams and events
    engine.attach()
    assert torch.equal(_run(model, x), plain)
    store = engine.store
    engine.suspend()
    assert not engine.attached and engine.suspended and not engine._slots and engine.store is store
    assert not any(b._forward_pre_hooks for b in model.transformer_blocks)
    engine.resume()
    assert torch.equal(_run(model, x), plain) and engine.store is store
    engine.detach()
    assert torch.equal(_run(model, x), plain)
