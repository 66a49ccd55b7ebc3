"""Memory plan: the real pipeline run on data-free tensors, bytes counted per phase on the device and in host RAM.

`PlanningRuntime` (planning_machine.py) stands in for the device runtime (pipeline/machine.py) under the same
pipeline code. It loads each network on "meta" with one block per stack (identical blocks allocate identically),
attention on a flash-style kernel that allocates only its output (what flash-attn and SDPA's efficient kernels do
on a GPU; where the target card runs it on float16 copies of q, k and v, those copies too; where it has no fused
kernel at all, SDPA's math kernel and its scores: engines/attention.planned_kernel), and a VAE whose repeated chunk decodes replay the first one's allocations;
`byte_count.PlanningAccountant` counts every tensor the run makes.

Weights are not counted as tensors: every place/unplace cuts a phase into stretches, and each stretch records which
networks were placed (with which profile section) and the peak of everything else. A plan then adds the engine's
footprint of each placed network for a profile's settings to each stretch. So the activations are traced once per
folder, preset and the profile settings that shape them (`_shaping`), and trying other resident-block counts or
placements (`fit_profile`) is arithmetic. Traces are kept for the life of the process and on disk (plan_cache.py).

One denoising step is enough: every step allocates the same. With the step cache, two: a full evaluation after
the first step also holds the residuals its CFG branch saved at the last one (and the last step always runs in full).
Weights read from the checkpoint count as host RAM only where the run copies them (packed block images);
memory-mapped pages are the OS page cache. The decode copies its frames out as a run on the card would
(planning_machine.PlannedStreams): on CUDA each chunk's frames stay on the device until their copy has landed, and the
output video is page-locked, counted as the pinned allocator rounds it (byte_count).

The kernel probes (engines/probes.py) are not counted: on a CUDA device they run in the preflight, before any weight
is read (auto's timed call included: 151 MB of q, k and v); where the preflight did not run them (the CPU) they run
when the levers attach, after the DiT is placed and before its first step, and free the few MB they make before
they return, while that step holds hundreds of MB more than is alive then at any size (tests/test_plan_decode.py).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .assumed_format import assume_format as assume_format_of
from .byte_count import fmt_bytes
from ..loading.model_folder import ModelFolder
from ..engines.host_store import HostArenas
from ..engines.streaming import ARENA_BYTES, packed_budget_bytes, streaming_footprint
from ..pipeline.phases import PhasePipeline
from ..pipeline.preview import traced_preview
from .plan_cache import PlanCache, folder_identity
from ..engines.attention import attention_precision, math_attention
from ..engines.fast_matmul import choose_matmul
from ..engines.target import planned_target
from .planned_models import ModelShape
from .planning_machine import PlanningRuntime, Stretch, Trace
from ..profiles import Preset, Profile
from ..pipeline.machine import streaming_settings
from ..pipeline.sampling import latent_shape
from ..files.video import mp4_writer_host_bytes, postprocess_host_bytes
from ..engines.levers import SpeedOptions

PLAN_PROMPT = "a memory plan"          # step_llm pads every prompt to the same length: any text plans the same
CACHED_STEPS = 2                       # denoising steps planned under the step cache (see the module docstring)


@dataclass
class PhasePlan:
    peak_vram_bytes: int = 0
    peak_host_bytes: int = 0


@dataclass
class Plan:
    profile: str
    preset: str
    phases: dict[str, PhasePlan] = field(default_factory=dict)
    kept_dit_bytes: int = 0     # RAM the DiT keeps between videos, counted in every other phase (0: not kept)

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
        if self.kept_dit_bytes:
            rows.append(f"(host RAM includes the DiT kept between videos: {fmt_bytes(self.kept_dit_bytes)})")
        return "\n".join(rows)


# ---------------------------------------------------------------- plans

def plan_memory(folder: ModelFolder, profile: Profile, preset: Preset, assume_format: str | None = None,
                options: SpeedOptions | None = None, layout=None, capability: tuple[int, int] | None = None,
                keep_dit: bool = False) -> Plan:
    """Peak device and host bytes per phase of `profile` at `preset`. `assume_format` ("int8" | "fp8") plans the
    folder's unquantized DiT and step_llm as quantize.py would write them (a quantized folder plans as it is);
    `options`: the run's speed options (the step cache's saved residuals are planned); `layout` (parallel.Layout):
    rank 0 of a parallel run; `capability`: the target card's (None: a fused attention kernel is assumed);
    `keep_dit`: the DiT is kept between videos (see evaluate)."""
    return evaluate(trace(folder, profile, preset, assume_format, options, layout, capability), profile, preset,
                    keep_dit)


def evaluate(phases: Trace, profile: Profile, preset: Preset, keep_dit: bool = False) -> Plan:
    """The plan of a traced run with the weights `profile` places (its resident blocks, sources, budgets). With
    `keep_dit` (a batch, the web page, an API session: pipeline/warm.py), what the DiT keeps in RAM between videos
    (`kept_dit_bytes`) is alive in every phase but the denoising, whose own placement holds it."""
    plan = Plan(profile.name, str(preset))
    for name, stretches in phases.items():
        vram = host = 0
        for stretch in stretches:
            held = [footprint(shape, streaming_settings(profile, section, shape.blocks), profile)
                    for shape, section in stretch.placed]
            vram = max(vram, stretch.device_bytes + sum(d for d, _ in held))
            host = max(host, stretch.host_bytes + sum(h for _, h in held))
        plan.phases[name] = PhasePlan(vram, host)
    if phases.get("decode"):
        plan.phases["write"] = write_phase(phases["decode"][-1], preset, profile.torch_dtype)
    if keep_dit:
        plan.kept_dit_bytes = kept_dit_bytes(phases, profile)
        for name, phase in plan.phases.items():
            if name != "denoise":
                phase.peak_host_bytes += plan.kept_dit_bytes
    return plan


def kept_dit_bytes(phases: Trace, profile: Profile) -> int:
    """RAM a DiT parked between videos holds (engines/placement.park: nothing on the device): its packed block
    copies (the arenas of a streamed stack; page-locked on a GPU) and, on a CPU, where the device is RAM, the
    weights it places (resident blocks and the rest; slots and staging are freed)."""
    shape = next((shape for stretch in phases.get("denoise", []) for shape, section in stretch.placed
                  if section == "dit"), None)
    if shape is None:
        return 0
    settings = streaming_settings(profile, "dit", shape.blocks)
    device, host = footprint(shape, settings, profile)
    if settings is not None:
        resident = min(settings.resident_blocks, shape.blocks)
        slots = min(settings.prefetch + 1, shape.blocks - resident)
        device -= slots * shape.block_bytes
        arenas = HostArenas(shape.block_bytes, ARENA_BYTES, pin=False)
        host = arenas.cost(arenas.fit(packed_budget_bytes(profile), shape.blocks - resident)) \
            if settings.source == "ram" else 0
    return host + (device if profile.device == "cpu" else 0)


def write_phase(after_decode: Stretch, preset: Preset, dtype: torch.dtype) -> PhasePlan:
    """Writing the mp4, after the decode (no network placed): what the decode left alive (the decoded video in
    host RAM, the prompt embeddings on the device), the uint8 frames made from it and the mp4 writer (ffmpeg).
    Not traced: video.py estimates these from the frame size (tests/test_video.py measures them)."""
    shape = latent_shape(preset.frames, preset.height, preset.width)
    extra = (postprocess_host_bytes(shape.num_frames, shape.height, shape.width, dtype)
             + mp4_writer_host_bytes(shape.num_frames, shape.height, shape.width))
    return PhasePlan(after_decode.device_bytes, after_decode.host_bytes + extra)


def footprint(shape: ModelShape, streaming, profile: Profile) -> tuple[int, int]:
    """(device bytes, host bytes) that placing a network of `shape` holds: all its weights on the device, or what
    the block streamer reports for a streamed stack (engines.streaming.streaming_footprint: the engine's own
    accounting)."""
    other = shape.held_other_bytes(profile.device)
    if streaming is None:
        return other + shape.blocks * shape.block_tensor_bytes, 0
    held = streaming_footprint(shape.block_bytes, shape.blocks, other, streaming.resident_blocks,
                               streaming.prefetch, streaming.source, packed_budget_bytes(profile),
                               cuda=profile.device == "cuda")
    return held.device_bytes, held.host_bytes


def fit_profile(folder: ModelFolder, profile: Profile, preset: Preset, budget_bytes: int,
                assume_format: str | None = None, options: SpeedOptions | None = None,
                layout=None, capability: tuple[int, int] | None = None) -> tuple[Profile, Plan]:
    """Stream step_llm if it does not fit whole, and lower the profile's resident DiT / step_llm blocks (upper
    bounds) to the most that fit `budget_bytes` of device memory. Returns the adjusted profile and its plan, which
    may still exceed the budget when even zero resident blocks do not fit (the caller then steps down the ladder).
    `layout` (parallel.Layout): plan one rank of a parallel run; `capability`: the target card's."""
    phases = trace(folder, profile, preset, assume_format, options, layout, capability)
    plan = evaluate(phases, profile, preset)
    te = profile.text_encoders
    if te.placement == "device" and plan.phases["text"].peak_vram_bytes > budget_bytes:
        streamed = replace(te, placement="stream", resident_blocks=0, prefetch=max(1, te.prefetch))
        profile = replace(profile, text_encoders=streamed)   # step_llm whole does not fit: stream it
    for section, phase in (("dit", "denoise"), ("text_encoders", "text")):
        settings = getattr(profile, section)
        if getattr(settings, "placement", "stream") != "stream":
            continue
        for resident in range(settings.resident_blocks, -1, -1):
            candidate = replace(profile, **{section: replace(settings, resident_blocks=resident)})
            plan = evaluate(phases, candidate, preset)
            if plan.phases[phase].peak_vram_bytes <= budget_bytes:
                break
        profile = candidate
    return profile, plan


# ---------------------------------------------------------------- tracing

_TRACES: dict[tuple, Trace] = {}       # this process's traces (of some phases); disk_cache() keeps them too


def disk_cache() -> PlanCache | None:
    return PlanCache()


def trace(folder: ModelFolder, profile: Profile, preset: Preset, assume_format: str | None = None,
          options: SpeedOptions | None = None, layout=None, capability: tuple[int, int] | None = None) -> Trace:
    """The stretches of one planned run: with a `layout`, of rank 0 of that parallel run. Text and denoise are
    cached per folder, preset, `_shaping(profile)` without the VAE's settings, speed options and parallel layout;
    decode with them (trying an untiled decode traces the decode only). From this process's cache or the disk's."""
    folder = assume_format_of(folder, assume_format)
    options = options or SpeedOptions()
    layout = layout and replace(layout, rank=0)
    base = (folder.weight_format, assume_format, (preset.frames, preset.height, preset.width), options, layout)
    base += (choose_matmul(profile, folder.weight_format, planned_target(profile, capability))[0],)  # its temporaries
    if profile.device == "cuda" and math_attention(capability, profile.torch_dtype):
        base += ("math attention",)     # the card has no fused kernel for the compute dtype
    elif profile.device == "cuda" and attention_precision(capability, profile.torch_dtype):
        base += ("float16 attention",)  # it has one for float16: the kernel runs on float16 copies
    shaping, identity = _shaping(profile), folder_identity(folder.root)
    keys = {("text", "image", "denoise"): base + (replace(shaping, vae=None),), ("decode",): base + (shaping,)}
    memos = {names: (identity, repr(key)) for names, key in keys.items()}
    parts = {names: _cached(memo) for names, memo in memos.items()}
    if None in parts.values():
        traced = _traced(folder, profile, preset, options, layout, capability,
                         denoise=parts[("text", "image", "denoise")] is None)
        for names, memo in memos.items():
            if parts[names] is None:   # (only a TI2V run has an image phase)
                parts[names] = _store(memo, {name: traced[name] for name in names if name in traced})
    return {name: stretches for part in parts.values() for name, stretches in part.items()}


def _cached(memo: tuple[str, str]) -> Trace | None:
    """A trace part by (folder identity, what was traced): the identity of the folder's files as they are now, so
    that a long-running process (the web page) sees a folder re-quantized in place as another folder."""
    if memo not in _TRACES:
        disk = disk_cache()
        phases = trace_from_json(disk.get(disk.key(*memo))) if disk else None
        if phases is None:
            return None
        _TRACES[memo] = phases
    return _TRACES[memo]


def _store(memo: tuple[str, str], phases: Trace) -> Trace:
    _TRACES[memo] = phases
    disk = disk_cache()
    if disk:
        disk.put(disk.key(*memo), trace_to_json(phases))
    return phases


def _traced(folder: ModelFolder, profile: Profile, preset: Preset, options: SpeedOptions, layout,
            capability: tuple[int, int] | None = None, denoise: bool = True, preview: bool = True) -> Trace:
    """The planned run. Without `denoise`, the decode is traced after a denoise of no steps (the text phase
    makes the embeddings that stay alive meanwhile; the latents are handed over as the denoise hands them).
    A TI2V folder's run encodes its first image (the image phase: one frame through the VAE encoder) between
    text and denoise; the image itself is a data-free tensor of the preprocessed size. The live preview's device
    tensors are always counted (`preview`; a few MB at the release's size, and the web page's jobs preview)."""
    runtime = PlanningRuntime(folder, profile, options, layout, capability)
    pipe = PhasePipeline(folder, profile, progress=False, runtime=runtime, options=options)
    if preview:
        pipe.preview = traced_preview(pipe.latent_channels())
    steps = CACHED_STEPS if options.cache else 1
    shape = latent_shape(preset.frames, preset.height, preset.width, channels=pipe.latent_channels())
    with runtime.accountant:
        embeds = pipe.encode_prompt(PLAN_PROMPT)
        extra = {}
        if folder.kind == "ti2v":
            extra["image"] = torch.empty((1, 1, 3, shape.height, shape.width))
        if not denoise:       # latents as the denoise leaves them; not counted, the caller holds them meanwhile
            with runtime.accountant.untracked():
                extra = {"start_step": steps, "latents": torch.empty(shape.shape, device=runtime.device)}
                if folder.kind == "ti2v":   # the condition latents (the image phase is traced with the denoise)
                    extra["image_latents"] = torch.empty((1, 1, *shape.shape[2:]))
        pipe(prompt_embeds=embeds, num_frames=preset.frames, height=preset.height, width=preset.width,
             num_inference_steps=steps, output_type="video", seed=0, **extra)
    return runtime.phases


def trace_to_json(phases: Trace) -> dict:
    return {name: [{"placed": [[asdict(shape), section] for shape, section in s.placed],
                    "device_bytes": s.device_bytes, "host_bytes": s.host_bytes} for s in stretches]
            for name, stretches in phases.items()}


def trace_from_json(data) -> Trace | None:
    """A trace from trace_to_json's form; None when `data` is not one (a damaged cache entry)."""
    try:
        return {name: [Stretch(tuple((ModelShape(**shape), section) for shape, section in s["placed"]),
                               int(s["device_bytes"]), int(s["host_bytes"])) for s in stretches]
                for name, stretches in data.items()}
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _shaping(profile: Profile) -> Profile:
    """The profile without what only decides where weights live (and names): what the traced activations depend on
    (compute dtype, CFG mode, token and head chunks, VAE tiles)."""
    return replace(profile, name="", path=Path(), description="", device="", min_vram_gib=0.0, weight_format="",
                   attention="", presets=(), memory=None, dit=None, text_encoders=None)


def plan_per_rank(folder, profile: Profile, preset: Preset, layout,
                  assume_format: str | None = None, options=None) -> Plan:
    """Peak device and host bytes per phase on rank 0 of `layout` (the largest: it also runs the text phase and
    the decode)."""
    if layout.cfg == 2:
        profile = replace(profile, cfg_mode="batch")   # as ParallelRuntime runs it
    return evaluate(trace(folder, profile, preset, assume_format, options, layout), profile, preset)
