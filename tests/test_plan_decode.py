"""What the memory plan counts around the VAE decode and the kernel probes (issue 17, point 3).

The decode: on a CUDA card each chunk's frames leave the device asynchronously (engines/frame_copies.py): the sources
of copies in flight stay on the device while the next chunk decodes, and the output video is page-locked host memory
(which torch's pinned allocator rounds up to a power of two). The plan (the planning runtime on data-free tensors) is
checked against the same decode run on real tensors on the CPU, down the CUDA path with stand-in streams and events,
counted by an accountant. The probes: they run before the first denoising step and free what they allocate, far below
what a step holds, so the plan leaves them out."""
from __future__ import annotations

import contextlib

import pytest
import torch

from lowvram_stepvideo.engines import attention, frame_copies, host_store, probes, tiling
from lowvram_stepvideo.engines.target import Target
from lowvram_stepvideo.loading.model_folder import open_model_folder
from lowvram_stepvideo.pipeline import machine
from lowvram_stepvideo.pipeline.phases import PhasePipeline
from lowvram_stepvideo.pipeline.sampling import latent_shape
from lowvram_stepvideo.planning import plan, planning_machine
from lowvram_stepvideo.planning.byte_count import DEVICE, HOST, ByteAccountant, PlanningAccountant
from lowvram_stepvideo.profiles import Preset, load_profile, with_overrides


@pytest.fixture(autouse=True)
def fresh_traces(monkeypatch):
    monkeypatch.setattr(plan, "_TRACES", {})
    monkeypatch.setattr(plan, "disk_cache", lambda: None)


def _pinned(nbytes: int) -> int:
    """What torch's caching host allocator takes for a page-locked request (CachingHostAllocator.h: PowerOf2Ceil)."""
    size = 1
    while size < nbytes:
        size *= 2
    return size


def test_page_locked_allocations_count_what_the_pinned_allocator_takes():
    acc = PlanningAccountant()
    with acc:
        pinned = host_store.host_buffer(3_000_000, pin=True)
        assert acc.live[HOST] == _pinned(3_000_000) == 4 * 2**20
        pageable = host_store.host_buffer(3_000_000, pin=False)
        assert acc.live[HOST] == 4 * 2**20 + 3_000_000
        del pinned, pageable
        assert acc.live[HOST] == 0


# ---- the decode: the plan against the decode run on the CPU down the CUDA path ---------------------------------

class _DecoderClock:
    """Counts the VAE's chunk decodes of the measured run: its stand-in copies land while the decoder runs next."""
    decodes = 0


class _Event:
    def __init__(self):
        self.at = None

    def record(self, stream=None):
        self.at = _DecoderClock.decodes

    def query(self):
        return _DecoderClock.decodes > self.at

    def synchronize(self):
        self.at = -1


class _Stream:
    def wait_event(self, event):
        pass


def _measured_decode(folder, profile, shape, monkeypatch) -> tuple[int, int]:
    """(device bytes, page-locked host bytes) at the peak of the decode while the VAE is placed, on real tensors on
    the CPU: the CUDA copy path with stand-in streams and events whose copies land once the decoder has run again,
    and page-locked buffers counted as the pinned allocator takes them."""
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    acc = ByteAccountant()

    def buffer(nbytes, pin):
        assert pin
        with acc.untracked():
            made = torch.empty(nbytes, dtype=torch.uint8)
        acc.add_base("page-locked", _pinned(nbytes))
        return made
    monkeypatch.setattr(host_store, "host_buffer", buffer)
    plain = tiling.frame_copies     # a run's runtime leaves its copies to decode_tiled: the CUDA path on the CPU
    monkeypatch.setattr(tiling, "frame_copies", lambda device: frame_copies.FrameCopies(device, cuda=True)
                        if torch.device(device).type == "cpu" else plain(device))
    runtime = machine.DeviceRuntime(folder, profile, device="cpu", log=lambda msg: None)
    vae = runtime.load("vae", profile.torch_dtype)          # loaded before counting, as the plan leaves weights out
    decode_chunk = vae.decode_chunk

    def counted_decode(z):
        out = decode_chunk(z)
        _DecoderClock.decodes += 1
        return out
    vae.decode_chunk = counted_decode
    runtime.load = lambda component, dtype: vae
    peaks = {}
    runtime.place = lambda model, section=None: acc.reset_peak()
    runtime.unplace = lambda model: peaks.update(acc.peak)
    latents = torch.randn(shape)
    with acc, torch.inference_mode():
        PhasePipeline(folder, profile, progress=False, runtime=runtime).decode(latents)
    return peaks["cpu"], peaks["page-locked"]


def _planned_decode(folder, profile, shape) -> tuple[int, int]:
    """(device bytes, host bytes) of the plan's decode while the VAE is placed: the planning runtime's decode of
    latents as the denoise hands them over."""
    runtime = planning_machine.PlanningRuntime(folder, profile)
    with runtime.accountant:
        with runtime.accountant.untracked():
            latents = torch.empty(shape)
        PhasePipeline(folder, profile, progress=False, runtime=runtime).decode(latents)
    placed = runtime.phases["decode"][1]
    return placed.device_bytes, placed.host_bytes


@pytest.mark.parametrize("tile, frames", [(0, 68), (3, 51)], ids=["untiled-4-chunks", "tiled-3-chunks"])
def test_the_planned_decode_holds_what_the_cuda_copies_hold(demo_dir, monkeypatch, tile, frames):
    """Equal to the byte: the frames kept on the device for their copies (with a single tile, the decoder's output
    itself, a view of more frames than it returns) and the page-locked video. The plan as it was, with plain copies
    and an output video of its own size, is short of both."""
    folder = open_model_folder(demo_dir)
    profile = with_overrides(load_profile("24gb"), vae_tile=tile, vae_overlap=1 if tile else 0)
    assert profile.device == "cuda"
    preset = Preset(frames, 64, 96, 1)
    pipe = PhasePipeline(folder, profile, progress=False, runtime=planning_machine.PlanningRuntime(folder, profile))
    shape = latent_shape(preset.frames, preset.height, preset.width, channels=pipe.latent_channels()).shape
    planned = _planned_decode(folder, profile, shape)
    measured = _measured_decode(folder, profile, shape, monkeypatch)
    assert planned == measured
    video = 3 * frames * preset.height * preset.width * profile.torch_dtype.itemsize
    assert measured[1] == _pinned(video) > video
    monkeypatch.setattr(planning_machine.PlanningRuntime, "frame_copies",
                        lambda self, blend: frame_copies.FrameCopies(blend, cuda=False))
    device, host = _planned_decode(folder, profile, shape)
    frame = 3 * preset.height * preset.width * profile.torch_dtype.itemsize
    assert measured[0] - device >= 17 * frame and host < measured[1]


def test_a_plan_for_the_cpu_copies_plainly(demo_dir):
    folder = open_model_folder(demo_dir)
    runtime = planning_machine.PlanningRuntime(folder, load_profile("cpu"))
    assert not runtime.frame_copies(runtime.device).cuda
    cuda = planning_machine.PlanningRuntime(folder, load_profile("24gb"))
    assert cuda.frame_copies(cuda.device).cuda and not cuda.frame_copies(torch.device("cpu")).cuda


# ---- the kernel probes: before the first step, freed, and far below a step -----------------------------------

def test_kernel_probes_free_their_memory_before_the_first_denoising_step(demo_dir, tmp_path, monkeypatch):
    """A run on a card whose attention needs a probe (bf16 on Turing runs on float16 copies, so SDPA is probed
    there; here on the CPU): the probe runs after the DiT is placed and before its first forward, and everything it
    allocated is freed when it returns."""
    monkeypatch.setattr(machine, "current_target", lambda device=None: Target((7, 5), "Tesla T4"))
    monkeypatch.setattr(probes, "_MEMO", {})
    monkeypatch.setattr(probes, "probes_file", lambda: tmp_path / "probes.json")
    folder = open_model_folder(demo_dir)
    profile = with_overrides(load_profile("cpu"), compute_dtype="bfloat16")
    acc, events = ByteAccountant(), []
    run_attention = probes._run_attention

    def probe(*args):
        before = acc.total("cpu")
        with acc.measure() as watch:
            found = run_attention(*args)
        events.append(("probe", before, acc.total("cpu"), watch.extra["cpu"]))
        return found
    monkeypatch.setattr(probes, "_run_attention", probe)
    pipe = PhasePipeline(folder, profile, progress=False, log=lambda msg: None)
    place = pipe.runtime.place

    def placing(model, section=None):
        place(model, section)
        if section == "dit":
            events.append(("placed",))
            model.register_forward_pre_hook(lambda module, args: events.append(("forward", acc.total("cpu"))))
    pipe.runtime.place = placing
    with acc, torch.inference_mode():
        pipe(prompt="a probe", num_frames=17, height=32, width=48, num_inference_steps=1, output_type="latent")
    order = [e[0] for e in events]
    assert order[:3] == ["placed", "probe", "forward"] and "probe" not in order[3:]
    _, before, after, peak = events[1]
    assert after == before and peak > 0                      # all it made is gone when it returns


def test_a_step_holds_far_more_than_a_probe_at_any_size():
    """The release's DiT at the smallest frame the pipeline takes: what its denoising step holds beyond what is
    alive when the levers attach (where a run probes) against everything a probe at its head size (128) makes,
    device and host together (measured here on the CPU)."""
    acc = ByteAccountant()
    with acc:
        found = probes._run_attention("sdpa", attention.run_function("sdpa", "float16"), "cpu", torch.bfloat16, 128)
    assert found.ok and acc.total("cpu") == 0
    probe_bytes = acc.peak["cpu"]
    folder = open_model_folder("stepfun-ai/stepvideo-t2v", published=True)
    at_attach, attach = [], planning_machine.PlanningRuntime.attach_levers

    def attaching(self, *args, **kwargs):
        at_attach.append(self.accountant.total(DEVICE))
        return attach(self, *args, **kwargs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(planning_machine.PlanningRuntime, "attach_levers", attaching)
        for name in ("8gb", "24gb"):
            phases = plan.trace(folder, load_profile(name), Preset(17, 16, 16, 1), "int8", capability=(8, 9))
            step = max(s.device_bytes for s in phases["denoise"]) - at_attach[-1]
            assert step > 100 * probe_bytes, (name, step, probe_bytes)
