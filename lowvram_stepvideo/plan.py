"""Memory plan: run the real pipeline for a profile and preset on fake tensors and count bytes per phase.

Under FakeTensorMode nothing is allocated and no weight is read: the compute device is replaced by "meta" and
`memory.ByteAccountant` adds up the bytes of live tensors per device. Attention is modelled as a flash-style kernel
that allocates only its output (what flash-attn / SDPA's efficient kernels do on a GPU). One denoising step is
enough: every step allocates the same. Weights read from the checkpoint count as host RAM only where the run copies
them (pinned block images, dtype conversions); memory-mapped pages are the OS page cache.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from .assumed_format import assume_format as assume_format_of
from .memory import ByteAccountant, fmt_bytes
from .model_folder import ModelFolder
from .offload import ARENA_BYTES, STAGING_BUFFERS, STAGING_BYTES
from .offload_store import BlockLayout, HostArenas
from .pipeline import PhasePipeline, stream_blocks
from .profiles import Preset, Profile
from .speed import SpeedOptions

GiB = 2**30
DEVICE, HOST = "meta", "cpu"           # the compute device is stood in for by "meta"


@dataclass
class PhasePlan:
    peak_vram_bytes: int = 0
    peak_host_bytes: int = 0


@dataclass
class Plan:
    profile: str
    preset: str
    phases: dict[str, PhasePlan] = field(default_factory=dict)

    @property
    def peak_vram_bytes(self) -> int:
        return max((p.peak_vram_bytes for p in self.phases.values()), default=0)

    @property
    def peak_host_bytes(self) -> int:
        return max((p.peak_host_bytes for p in self.phases.values()), default=0)

    def to_json(self, **extra) -> str:
        return json.dumps({"profile": self.profile, "preset": self.preset, "peak_vram_bytes": self.peak_vram_bytes,
                           "peak_host_bytes": self.peak_host_bytes,
                           "phases": {k: asdict(v) for k, v in self.phases.items()}, **extra}, indent=2)

    def table(self) -> str:
        rows = [f"memory plan: profile {self.profile}, {self.preset} (frames x height x width)",
                f"{'phase':<8} {'peak VRAM':>12} {'peak host RAM':>14}"]
        for name, p in self.phases.items():
            rows.append(f"{name:<8} {fmt_bytes(p.peak_vram_bytes):>12} {fmt_bytes(p.peak_host_bytes):>14}")
        rows.append(f"{'overall':<8} {fmt_bytes(self.peak_vram_bytes):>12} {fmt_bytes(self.peak_host_bytes):>14}")
        return "\n".join(rows)


def flash_style_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """Shape-only stand-in for a fused attention kernel: q (B, Sq, H, D) -> output of the same shape."""
    return torch.empty_like(q)


def plan_memory(folder: ModelFolder, profile: Profile, preset: Preset, assume_format: str | None = None,
                prompt: str = "a memory plan", options: SpeedOptions | None = None) -> Plan:
    """The plan of one run; `assume_format` ("int8" | "fp8") plans a release folder as its quantized version;
    `options`: the run's speed options (the step cache's saved residuals are counted)."""
    folder = assume_format_of(folder, assume_format)
    acc = ByteAccountant()
    plan = Plan(profile.name, str(preset))
    pipe = PhasePipeline(folder, profile, device="meta", progress=False, log=lambda msg: None, options=options)
    pipe.planning = True
    pipe.reader = lambda ref: torch.empty(ref.shape, dtype=ref.dtype, device="meta")
    pipe.phase_hook = _phase_recorder(acc, plan)
    _plan_placement(pipe, acc)
    with FakeTensorMode(allow_non_fake_inputs=True), acc:
        pipe(prompt=prompt, num_frames=preset.frames, height=preset.height, width=preset.width,
             num_inference_steps=1, output_type="video", seed=0)
    return plan


def _phase_recorder(acc: ByteAccountant, plan: Plan):
    def hook(name: str, event: str) -> None:
        if event == "start":
            acc.reset_peak()
        else:
            plan.phases[name] = PhasePlan(acc.peak[DEVICE], acc.peak[HOST])
    return hook


def _plan_placement(pipe: PhasePipeline, acc: ByteAccountant) -> None:
    """Weights are data-free tensors on the stand-in device from the start (loading is not counted); placing a
    model adds what the real placement would hold on the device and in host RAM, unplacing removes it."""
    load, placed = pipe.load, {}

    def plan_load(component, dtype):
        with acc.untracked():
            model = load(component, dtype)
        for m in model.modules():
            if hasattr(m, "attend"):
                m.attend = flash_style_attention
        _repeat_first_call(model)
        return model

    def plan_place(model, streaming=None):
        placed[id(model)] = footprint(model, streaming, pipe.profile)
        for dev, n in zip((DEVICE, HOST), placed[id(model)]):
            acc.add_base(dev, n)

    def plan_unplace(model):
        for dev, n in zip((DEVICE, HOST), placed.pop(id(model), (0, 0))):
            acc.add_base(dev, -n)

    pipe.load, pipe.place, pipe.unplace = plan_load, plan_place, plan_unplace


def _repeat_first_call(model: torch.nn.Module) -> None:
    """Identical blocks (and VAE chunks of one shape) allocate identically: only the first call computes, later
    ones return an output of the same shape. Planning then costs one block per stack instead of 48."""
    if hasattr(model, "decode_chunk"):
        model.decode_chunk = _memo_by_shape(model.decode_chunk)
    if hasattr(model, "transformer_blocks") or hasattr(model, "transformer"):
        for block in list(stream_blocks(model))[1:]:
            block.forward = lambda h, *args, **kwargs: torch.empty_like(h)


def _memo_by_shape(fn):
    shapes = {}

    def call(x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype)
        if key not in shapes:
            out = fn(x)
            shapes[key] = (tuple(out.shape), out.dtype)
            return out
        shape, dtype = shapes[key]
        return torch.empty(shape, dtype=dtype, device=x.device)
    return call


def footprint(model: torch.nn.Module, streaming, profile: Profile) -> tuple[int, int]:
    """(device bytes, host bytes) that placing `model` holds: all its weights on the device, or for a streamed
    stack the non-block weights + resident blocks + `prefetch + 1` slots on the device and the packed block
    images (within the pinned budget, source "ram") plus staging buffers in host RAM; see offload.py."""
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    if streaming is None or streaming.resident_blocks >= len(stream_blocks(model)):
        return total, 0
    blocks = stream_blocks(model)
    block = BlockLayout(blocks[0]).nbytes
    streamed = len(blocks) - streaming.resident_blocks
    slots = min(streaming.prefetch + 1, streamed)
    rest = total - sum(t.numel() * t.element_size() for t in blocks.parameters())
    device = rest + (streaming.resident_blocks + slots) * block
    host = 0
    if streaming.source == "ram":
        arenas = HostArenas(block, ARENA_BYTES, pin=False)
        host = arenas.cost(arenas.fit(int(profile.memory.packed_gb * GiB), streamed))
    if profile.device == "cuda" and (streaming.source == "disk" or host < streamed * block):
        host += STAGING_BUFFERS * min(STAGING_BYTES, block)
    return device, host


def fit_profile(folder: ModelFolder, profile: Profile, preset: Preset, budget_bytes: int,
                options: SpeedOptions | None = None) -> tuple[Profile, Plan]:
    """Stream step_llm if it does not fit whole, and lower the profile's resident DiT / step_llm blocks (upper
    bounds) until the plan fits `budget_bytes` of device memory. Returns the adjusted profile and its plan, which
    may still exceed the budget when even zero resident blocks do not fit (the caller then steps down the ladder)."""
    plan = plan_memory(folder, profile, preset, options=options)
    te = profile.text_encoders
    if te.placement == "device" and plan.phases["text"].peak_vram_bytes > budget_bytes:
        streamed = replace(te, placement="stream", resident_blocks=0, prefetch=max(1, te.prefetch))
        profile = replace(profile, text_encoders=streamed)   # step_llm whole does not fit: stream it
        plan = plan_memory(folder, profile, preset, options=options)
    for section, phase in (("dit", "denoise"), ("text_encoders", "text")):
        if section == "text_encoders" and profile.text_encoders.placement != "stream":
            continue
        block = _block_bytes(folder, "transformer" if section == "dit" else "step_llm", profile)
        for _ in range(3):   # a second pass covers the slots that streaming adds to a fully resident stack
            settings = getattr(profile, section)
            excess = plan.phases[phase].peak_vram_bytes - budget_bytes
            if settings.resident_blocks == 0 or excess <= 0:
                break
            fewer = max(0, settings.resident_blocks - -(-excess // block))
            profile = replace(profile, **{section: replace(settings, resident_blocks=fewer)})
            plan = plan_memory(folder, profile, preset, options=options)
    return profile, plan


def _block_bytes(folder: ModelFolder, component: str, profile: Profile) -> int:
    model = folder.open(component).load(profile.torch_dtype, "cpu",
                                        reader=lambda ref: torch.empty(ref.shape, dtype=ref.dtype, device="meta"))
    return BlockLayout(stream_blocks(model)[0]).nbytes
