"""What the pipeline's phases ask of the machine: load a network, place it on the compute device (whole, or its
blocks streamed per a profile section), take it off again, attach the DiT's speed levers, decode latents in tiles,
and mark phases (events to listeners, timings, freeing cached memory, a memory report). The phases reach the
engines (engines/) only through this interface.

Two implementations share it, so the planner and a real run are the same pipeline code:
- `DeviceRuntime` (here) runs for real: memory-mapped checkpoints and the streaming engines;
- `planning.planning_machine.PlanningRuntime` runs on data-free tensors, with one block per stack, and counts bytes.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import sys
import time
from typing import Callable, ContextManager, Protocol

import torch
from torch import nn

from ..defaults import SpeedOptions
from ..loading.model_folder import ModelFolder
from ..engines.target import current_target
from ..engines.host_store import release_cached_pinned_memory
from ..engines.levers import DiTLevers
from ..engines.parallel import Parallel
from ..engines.placement import attach_streaming, device_memory_report, find_blocks, offload_component, to_device
from ..engines.streaming import packed_budget_bytes
from ..engines.frame_copies import FrameCopies
from ..engines.tiling import decode_with_fallback, halving_tiles, tile_count
from ..profiles import Profile
from .warm import KeptDiT

PhaseListener = Callable[[str, str], None]     # (phase name, "start" | "end")
TileSize = tuple[int, int]                     # (height, width) of a VAE decode tile, in latent pixels


class Levers(Protocol):
    """What the denoising loop calls on the speed levers `attach_levers` gives (engines.levers.DiTLevers)."""

    def start_step(self, step: int, total_steps: int, read: Callable[[torch.Tensor], bool] | None = None) -> None: ...

    def branch(self, name: str) -> ContextManager: ...


def streaming_settings(profile: Profile, section: str | None, blocks: int):
    """The profile's settings for streaming a stack of `blocks` blocks placed per `section` ("dit" or
    "text_encoders"), or None when the model goes to the device whole (no section, placement "device", or every
    block resident)."""
    if section is None:
        return None
    settings = getattr(profile, section)
    if getattr(settings, "placement", "stream") == "device" or settings.resident_blocks >= blocks:
        return None
    return settings


class Runtime:
    """The interface, and what both runtimes share: phases and `placed`. `par`: this rank's place in a parallel
    run (the DiT's levers attach its splits), None for a single process."""

    par: Parallel | None = None
    blend_on_device = True     # VAE tiles blended where they are decoded; False when the plan says the device
                               # cannot hold a chunk's output (then on the host, as the frames go out)

    def __init__(self, folder: ModelFolder, profile: Profile, device=None,
                 log: Callable[[str], None] | None = None):
        self.folder, self.profile = folder, profile
        self.device = torch.device(device or profile.device)
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.timings: dict[str, float] = {}
        self.phase_listeners: list[PhaseListener] = []

    def load(self, component: str, dtype: torch.dtype) -> nn.Module:
        """A network of the folder ("transformer", "step_llm", "hunyuan_clip", "vae"), not yet placed."""
        raise NotImplementedError

    def place(self, model: nn.Module, section: str | None = None) -> None:
        """All weights on the device, or the block stack streamed per the profile's `section`."""
        raise NotImplementedError

    def unplace(self, model: nn.Module) -> None:
        raise NotImplementedError

    def attach_levers(self, dit: nn.Module, options: SpeedOptions, said: bool = False) -> DiTLevers:
        """The speed levers (engines/levers.py: attention kernel, kept expansions, fast matmuls, step cache, compile, the
        parallel splits) on the DiT for one denoising phase, as this runtime runs them; `said`: already logged
        once."""
        raise NotImplementedError

    def detach_levers(self, levers: DiTLevers) -> dict | None:
        """Undo `attach_levers`; what the levers did (for the sidecar), None when nothing ran for real."""
        levers.detach()
        return None

    def with_profile(self, profile: Profile) -> "Runtime":
        """This runtime running `profile`, sharing this one's state (log, timings, phase listeners); this one is
        left as it is. What a job uses to run a lowered profile; the planner traces each profile with a runtime of
        its own and never calls it."""
        other = copy.copy(self)
        other.profile = profile
        return other

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The model's stack of blocks (the DiT's or step_llm's) as the streaming engine sees it."""
        return list(find_blocks(model)[1])

    def vae_tiles(self, latent_shape: tuple[int, ...], tile: int, overlap: int) -> tuple[list[TileSize], int]:
        """The tile sizes a tiled decode of latents of this shape tries in turn (halving after an out-of-memory
        error), and how many tiles the first size makes."""
        tiles = halving_tiles(tile, overlap, tuple(latent_shape[-2:]))
        return tiles, tile_count(latent_shape, tiles[0], overlap)

    def decode_tiled(self, vae: nn.Module, latents: torch.Tensor, tiles: list[TileSize], overlap: int,
                     on_oom: Callable[[TileSize, TileSize], None],
                     progress: Callable[[int, int], None]) -> torch.Tensor:
        """The video of `latents` (on the CPU), decoded tile by tile with the first size of `tiles`; after an
        out-of-memory error, `on_oom(failed, next)` and the next size, the finished chunks kept. Tiles are blended
        on the device unless `blend_on_device` is off; each chunk's frames leave it once (engines/tiling.py)."""
        blend = self.device if self.blend_on_device else torch.device("cpu")
        return decode_with_fallback(vae.decode_chunk, latents, tiles, overlap, on_oom=on_oom, out_device="cpu",
                                    blend_device=blend, progress=progress, copies=self.frame_copies(blend))

    def frame_copies(self, blend: torch.device) -> FrameCopies | None:
        """How a decode blending on `blend` copies its frames out; None: as engines/tiling.py picks for that device
        (engines/frame_copies.py). The planner's runtime gives the copies of the card it plans for."""
        return None

    def free(self) -> None:
        """Give memory that is no longer referenced back (after a phase, after an out-of-memory error)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            release_cached_pinned_memory()   # e.g. a decoded video's page-locked RAM, once it is dropped

    @contextlib.contextmanager
    def placed(self, model: nn.Module, section: str | None = None):
        """The model on the device for the block; whatever happens inside (OOM included), it leaves after."""
        try:
            self.place(model, section)
            yield model
        finally:
            self.unplace(model)

    @contextlib.contextmanager
    def phase(self, name: str):
        self._notify(name, "start")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.free()
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
            self._notify(name, "end")
        self.report(name)

    def report(self, phase: str) -> None:
        """Called after a phase that ended normally."""

    def _notify(self, name: str, event: str) -> None:
        for listener in self.phase_listeners:
            listener(name, event)


class DeviceRuntime(Runtime):
    """The real thing: weights memory-mapped from the folder, placed whole or streamed (engines/streaming.py).
    `kept`: the DiT kept between videos (warm.py; None: each denoising phase loads the DiT and throws it away)."""

    def __init__(self, folder: ModelFolder, profile: Profile, device=None,
                 log: Callable[[str], None] | None = None, kept: KeptDiT | None = None):
        super().__init__(folder, profile, device, log)
        self.kept = kept

    def load(self, component: str, dtype: torch.dtype) -> nn.Module:
        if component != "transformer" or self.kept is None:
            return self.folder.open(component).load(dtype, "cpu")   # the DiT's kernels come with attach_levers
        key = self.dit_key(dtype)
        model = self.kept.take(key)
        if model is None:
            model = self.folder.open(component).load(dtype, "cpu")
            self.kept.loaded(model, key)
        return model

    def dit_key(self, dtype: torch.dtype) -> tuple:
        """What a kept DiT must match to be used again: the weight files as they are now, the compute dtype, the
        device and how it is placed."""
        files = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in self.folder.files("transformer"))
        blocks = self.folder.open("transformer", layers=0).config.num_layers
        return (files, str(dtype), str(self.device), streaming_settings(self.profile, "dit", blocks),
                packed_budget_bytes(self.profile))

    def place(self, model: nn.Module, section: str | None = None) -> None:
        kept = self.kept
        if kept is None or model is not kept.model:
            self._place(model, section)
            return
        reused = kept.unpark(model, self.device)
        if not reused:
            self._place(model, section)
        how = "kept in RAM from the last video" if reused else "loaded"
        self.log(f"DiT: on the device {kept.placed(reused):.2f} s after it was asked for ({how})")

    def _place(self, model: nn.Module, section: str | None = None) -> None:
        blocks = len(find_blocks(model)[1]) if section else 0
        settings = streaming_settings(self.profile, section, blocks)
        if settings is None:
            to_device(model, self.device)
            return
        engine = attach_streaming(model, self.device, resident=settings.resident_blocks,
                                  prefetch=settings.prefetch, source=settings.source,
                                  pin_budget_bytes=packed_budget_bytes(self.profile),
                                  cyclic=hasattr(model, "transformer_blocks"))   # the DiT runs in a loop
        self.log(f"{type(model).__name__}: {engine.summary()}")

    def unplace(self, model: nn.Module) -> None:
        if self.kept is not None and self.kept.keep(model):
            return                               # parked for the next video
        offload_component(model, discard=True)   # each phase loads its model and throws it away after

    def attach_levers(self, dit: nn.Module, options: SpeedOptions, said: bool = False) -> DiTLevers:
        card = current_target(self.device)    # of the device this runs on, not of the machine's first one
        levers = DiTLevers(dit, self.profile, options, self.device, card, par=self.par, log=self.log).attach()
        if not said:                        # once per pipeline (OOM retries attach again)
            self.log(levers.summary())
        return levers

    def detach_levers(self, levers: DiTLevers) -> dict | None:
        report = levers.report()
        levers.detach()
        counts = report["step_cache"]
        if counts:
            self.log(f"step cache: {counts['full']} full and {counts['cached']} cached DiT evaluations "
                     f"(threshold {counts['threshold']})")
        return report

    def report(self, phase: str) -> None:
        if self.device.type == "cuda":
            self.log(f"{phase}: done in {self.timings[phase]:.1f} s; {device_memory_report(self.device)}")
