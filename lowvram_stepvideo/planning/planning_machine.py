"""The planner's machine runtime: the pipeline's runtime interface on data-free tensors (see plan.py's docstring).

It loads each network on "meta" with one block per stack (identical blocks allocate identically), attaches the
engines and levers as the target card would run them (chosen by the same functions as a real run, for the card the
profile is for), and cuts each phase into stretches at every place/unplace; repeated calls with the same shapes
replay their allocations instead of running again (Replaying). With a parallel `layout`, the engines of rank 0 of
that run are attached too (their buffers counted, nothing sent). A plan for a CUDA card copies the decoded frames out
as a run there does (engines/frame_copies.py: each chunk's frames kept on the device until their asynchronous copy
has landed, the output video page-locked), on stand-in streams and events (PlannedStreams).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..engines.attention import planned_kernel
from ..engines.frame_copies import FrameCopies
from ..engines.target import planned_target
from ..engines.levers import DiTLevers, SpeedOptions
from ..engines.parallel import Layout, Parallel
from ..loading.model_folder import ModelFolder
from ..pipeline.machine import Runtime
from ..profiles import Profile
from .byte_count import DEVICE, HOST, PlanningAccountant
from .planned_models import ModelShape, planned_model

PLANNED_BLOCKS = 1                     # blocks built per stack for the plan
CACHED_DIT_BLOCKS = 3                  # DiT blocks built under the step cache (see PlanningRuntime.load)
REPLAYED = ("transformer", "vae", "head groups")   # what runs several times with the same shapes (see Replaying)


@dataclass(frozen=True)
class Stretch:
    """Part of a phase with the same networks placed: (shape, profile section) of each, and the peak bytes of
    everything else alive meanwhile (activations, inputs, outputs) on the device and in host RAM."""
    placed: tuple[tuple[ModelShape, str | None], ...]
    device_bytes: int
    host_bytes: int


Trace = dict[str, list[Stretch]]       # phase name -> its stretches, in order


class PlanningRuntime(Runtime):
    """The runtime of a planned run: see the module docstring. `phases` holds what it traced."""

    def __init__(self, folder: ModelFolder, profile: Profile, options: SpeedOptions | None = None,
                 layout: Layout | None = None, capability: tuple[int, int] | None = None):
        # "meta" with an index, so that moves to the device reach the accountant (see PlanningAccountant)
        super().__init__(folder, profile, device=torch.device(DEVICE, 0), log=lambda msg: None)
        self.accountant = PlanningAccountant()
        self.cached = bool(options and options.cache)
        self.phases: Trace = {}
        self.phase_listeners.append(self._on_phase)
        self._shapes: dict[int, ModelShape] = {}
        self._placed: dict[int, tuple[ModelShape, str | None]] = {}
        self._stretches: list[Stretch] | None = None
        self.par = Parallel.planned(layout) if layout else None
        self.capability = capability           # of the target card: which attention kernel it runs

    def load(self, component: str, dtype: torch.dtype):
        """Under the step cache (step_cache.py) the DiT's blocks do not all run with the same tensors alive: block
        0's output and residual stay alive through blocks 1..N-1, and block 1's input is that output. So the DiT is
        built with blocks 0, 1 and 2 (the rest run as block 2), and it is not replayed: each call leaves its CFG
        branch's saved residuals alive, which a replay would not."""
        blocks = PLANNED_BLOCKS
        if self.cached and component == "transformer":
            blocks = max(blocks, CACHED_DIT_BLOCKS)
        with self.accountant.untracked():     # weights are counted by their footprint when placed
            model, shape = planned_model(self.folder, component, dtype, blocks,
                                         attend=planned_kernel("sdpa", self.capability, dtype))
        if "head groups" in REPLAYED:
            for m in model.modules():
                if hasattr(m, "head_group"):
                    m.head_group = _Replay(m.head_group, self.accountant)
        if component in REPLAYED and not (self.cached and component == "transformer"):
            model = Replaying(model, self.accountant)
        self._shapes[id(model)] = shape
        return model

    def place(self, model, section: str | None = None) -> None:
        self._cut()
        self._placed[id(model)] = (self._shapes[id(model)], section)

    def unplace(self, model) -> None:
        self._cut()
        self._placed.pop(id(model), None)

    def attach_levers(self, dit, options: SpeedOptions, said: bool = False) -> DiTLevers:
        """The levers as the profile's target card would run them (see engines/levers.py), on the DiT itself; with a
        `layout`, rank 0's parallel engines around them."""
        target = planned_target(self.profile, self.capability)
        return DiTLevers(getattr(dit, "model", dit), self.profile, options, self.device, target,
                         planning=True, par=self.par).attach()

    def frame_copies(self, blend: torch.device) -> FrameCopies:
        """The copies of a run on the profile's device: on a CUDA card, the asynchronous path (PlannedStreams)."""
        cuda = self.profile.device == "cuda" and blend == self.device
        return FrameCopies(blend, cuda, PlannedStreams(self.accountant) if cuda else None)

    def free(self) -> None:
        """Nothing to give back. No full garbage collection either (0.1-0.2 s each with torch loaded): the planned
        run frees its tensors by reference counting (tests/test_runtime.py checks the plan is the same with one)."""

    def _on_phase(self, name: str, event: str) -> None:
        if event == "start":
            self._stretches = self.phases.setdefault(name, [])
            self.accountant.reset_peak()
        else:
            self._cut()
            self._stretches = None

    def _cut(self) -> None:
        """End the current stretch (the set of placed networks is about to change) and start the next."""
        acc = self.accountant
        if self._stretches is not None:
            self._stretches.append(Stretch(tuple(self._placed.values()), acc.peak[DEVICE], acc.peak[HOST]))
        acc.reset_peak()


class Replaying(nn.Module):
    """A network as the plan runs it: a call (forward, or the VAE's decode_chunk) with arguments of shapes seen
    before is not computed again; its allocations are replayed instead: the same peak above what is live then, and
    an output of the same shape and layout in the same place, a view of a storage of the same size (the VAE's
    frames are a view of more frames than it returns, and whoever keeps them keeps them all). (The DiT runs twice
    per step with sequential CFG; a full-length decode is hundreds of tiles of a few shapes; attention in head
    groups computes each group alike.)"""

    def __init__(self, model: nn.Module, accountant: PlanningAccountant):
        super().__init__()
        self.model = model
        self._forward = _Replay(model, accountant)
        if hasattr(model, "decode_chunk"):
            self.decode_chunk = _Replay(model.decode_chunk, accountant)

    def forward(self, *args):
        return self._forward(*args)


class _Replay:
    def __init__(self, fn, accountant: PlanningAccountant):
        self.fn, self.accountant = fn, accountant
        self._seen: dict[tuple, tuple] = {}

    def __call__(self, *args):
        acc = self.accountant
        key = tuple((tuple(a.shape), a.dtype, acc.label(a)) if isinstance(a, torch.Tensor) else a for a in args)
        if key not in self._seen:
            with acc.measure() as watch:
                out = self.fn(*args)
            layout = (tuple(out.shape), out.stride(), out.storage_offset(), out.untyped_storage().nbytes())
            self._seen[key] = (layout, out.dtype, acc.label(out), dict(watch.extra))
            return out
        (shape, stride, offset, nbytes), dtype, where, extra = self._seen[key]
        for device, peak in extra.items():
            acc.note_transient(device, peak)
        storage = torch.empty(nbytes // dtype.itemsize, dtype=dtype, device="cpu" if where == HOST else DEVICE)
        return storage.as_strided(shape, stride, offset)


class PlannedStreams:
    """torch.cuda's streams and events as FrameCopies uses them, for a planned run on the data-free device. A copy
    lands once the device has made a tensor after it was queued: a chunk's frames (milliseconds over the bus) land
    while the next chunk decodes (seconds), not while the host queues the rest of its own chunk's copies. So the
    sources FrameCopies keeps alive until then are alive in the plan."""

    def __init__(self, accountant: PlanningAccountant):
        self.accountant = accountant

    def Event(self) -> "_PlannedEvent":   # noqa: N802 (torch.cuda's names)
        return _PlannedEvent(self.accountant)

    def Stream(self, device=None) -> "_PlannedStream":   # noqa: N802
        return _PlannedStream()

    def current_stream(self, device=None) -> "_PlannedStream":
        return _PlannedStream()

    def stream(self, stream: "_PlannedStream"):
        return contextlib.nullcontext()


class _PlannedStream:
    def wait_event(self, event: "_PlannedEvent") -> None:
        pass


class _PlannedEvent:
    def __init__(self, accountant: PlanningAccountant):
        self.accountant, self.at = accountant, None

    def record(self, stream: _PlannedStream | None = None) -> None:
        self.at = self.accountant.made[DEVICE]

    def query(self) -> bool:
        return self.accountant.made[DEVICE] > self.at

    def synchronize(self) -> None:
        self.at = -1
