"""The presets a run tries, in order: from the profile's ladder, the memory plan's fit on a GPU (the largest
preset that fits the card, with the profile's layout lowered to fit), or from a resume checkpoint's preset."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..engines.parallel import Parallel, processes_on_this_machine
from ..pipeline.phases import PhasePipeline
from ..planning.budgets import shared_by
from ..planning.decode_blend import blends_on_device
from ..planning.fit import clamped, first_fit, profile_budget
from ..profiles import Preset, Profile, ladder_from
from .resume import saved_request
from .warm import ram_held

GiB = 2**30


def resume_ladder(ladder: list[Preset], ckpt: Path) -> list[Preset]:
    """The ladder from the preset the checkpoint was saved at (an earlier run may have stepped down on OOM)."""
    saved = saved_request(ckpt)
    at = [i for i, p in enumerate(ladder) if saved and str(p) == saved.get("preset")]
    return ladder[at[0]:] if at else ladder


def fit_to_card(pipe: PhasePipeline, ladder: list[Preset], vram_bytes: int | None = None,
                log: Callable[[str], None] = print, ram_bytes: int | None = None,
                layout=None, decided: dict | None = None, held_ram_bytes: int = 0) -> tuple[list[Preset], Profile]:
    """The ladder without its head presets the memory plan says do not fit the budget (planning/budgets.py: this
    machine's free VRAM and available RAM minus their reserves, or a card of `vram_bytes` in a machine with
    `ram_bytes`), and pipe's profile with its resident blocks and packed RAM lowered to what fits (`pipe` is left as
    it is: run the result with `pipe.with_profile`). `layout` (engines.parallel.Layout): plan this rank's share of
    a parallel run, with the host RAM shared by the run's processes on this machine. `decided` gets "blend_on_device": where the decode blends its VAE tiles (planning/decode_blend.py).
    `held_ram_bytes`: RAM this process holds for the run already (a DiT kept from the last video, run/warm.py),
    counted as available."""
    budget = shared_by(profile_budget(pipe.profile, vram_bytes, ram_bytes),
                       processes_on_this_machine() if layout else 1)
    budget = replace(budget, host_bytes=budget.host_bytes + held_ram_bytes)
    asked = clamped(pipe.folder, pipe.profile)      # a count above the stack's size is not a lowering
    tried: dict = {}
    found = first_fit(pipe.folder, pipe.profile, ladder, budget, tried, pipe.options, layout)
    if found is None:
        log(f"plan: even {ladder[-1]} is planned above the budget ({budget.vram_from}; {budget.host_from}); "
            "trying it anyway")
        return ladder[-1:], pipe.profile
    profile, plan = tried[found]
    on_device = blends_on_device(plan, budget, profile, ladder[found])
    if decided is not None:
        decided["blend_on_device"] = on_device
    if not on_device:
        log("plan: the device cannot hold a decoded chunk beside the VAE's tiles; tiles are blended in host RAM")
    if found:
        log(f"plan: {ladder[0]} does not fit ({budget.vram_from}); using {ladder[found]}")
    if profile.dit.resident_blocks < asked.dit.resident_blocks:
        log(f"plan: DiT resident blocks lowered from {asked.dit.resident_blocks} to {profile.dit.resident_blocks} "
            "to fit")
    if profile.vae.tile == 0 and pipe.profile.vae.tile:
        log("plan: the VAE decode fits untiled (the release's numerics, no tile seams)")
    if profile.memory.packed_gb < pipe.profile.memory.packed_gb:
        log(f"plan: packed host RAM lowered from {pipe.profile.memory.packed_gb:g} to {profile.memory.packed_gb:.1f} "
            f"GiB to fit ({budget.host_from}); the other blocks are read from disk")
    log(f"plan: {plan.peak_vram_bytes / GiB:.1f} GiB device and {plan.peak_host_bytes / GiB:.1f} GiB host peak, "
        f"{profile.dit.resident_blocks} DiT blocks resident")
    return ladder[found:], profile


def plan_ladder(pipe: PhasePipeline, preset: Preset, resume_from: Path | None, log,
                par: Parallel | None = None) -> tuple[list[Preset], PhasePipeline]:
    """The presets to try in order: the memory plan's fit on a GPU, or from the checkpoint's preset on resume; and
    the pipeline to run them with (`pipe`, or `pipe` with the profile the plan lowered). Under torchrun each rank
    plans its share on its own card, and all run the preset that fits the smallest."""
    ladder = ladder_from(pipe.profile.presets, preset)
    if resume_from is not None:
        return resume_ladder(ladder, resume_from), pipe
    if pipe.device.type == "cuda":
        full = ladder
        decided: dict = {}
        ladder, fitted = fit_to_card(pipe, ladder, None, log, layout=par and par.layout, decided=decided,
                                     held_ram_bytes=ram_held(pipe))
        pipe = pipe.with_profile(fitted)                        # (fitted to the free VRAM and available RAM)
        pipe.runtime.blend_on_device = decided.get("blend_on_device", True)
        if par is not None:
            ladder = full[par.agree_max(len(full) - len(ladder)):]
    return ladder, pipe
