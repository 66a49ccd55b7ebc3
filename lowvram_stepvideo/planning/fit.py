"""The verdict of a memory plan against a machine: does this profile's preset fit, and if not, what would.

`check_fit` plans the requested preset with the profile's layout adjusted to the budget (`budgets.py`): resident
blocks lowered until the device peak fits, packed host copies lowered (the rest read from disk) until host RAM
fits; the VAE decodes untiled where that fits too. When the preset does not fit it looks down the profile's
ladder for the largest that does, and when nothing on the ladder fits, at the other profiles of the same device kind, from the hungriest down.

Plans grow with the preset (more tokens, more activations; the weights are the same), so "the largest preset
that fits" is found by bisection: the first preset, then the last, then halves in between.
"""
from __future__ import annotations

from dataclasses import replace

from .assumed_format import assume_format as assume_format_of
from .budgets import Budget, machine_budget, shared_by
from .decode_blend import fits_some_way
from .estimate import estimate_run
from ..loading.model_folder import ModelFolder
from .plan import Plan, fit_profile
from .stacks import clamped, packed_blocks, packed_bytes
from .verdict import Verdict
from ..profiles import Preset, Profile, ladder_from, list_profiles, load_profile

GiB = 2**30
HOST_PASSES = 3          # rounds of "less packed RAM, then refit the resident blocks"
ADJUSTABLE = ("text", "denoise")   # phases whose layout fitting changes (step_llm and DiT blocks, packed RAM)


def check_fit(folder: ModelFolder, profile: Profile, preset: Preset, vram_bytes: int | None = None,
              ram_bytes: int | None = None, assume_format: str | None = None, options=None,
              layout=None, card=None, capability: tuple[int, int] | None = None, processes: int = 1) -> Verdict:
    """The verdict for `preset` (and the ladder below it) on a machine with a card of `vram_bytes` and
    `ram_bytes` of RAM (None: read this machine); `layout` (parallel.Layout): for one rank of a parallel run, with
    `processes` of its ranks sharing the machine's RAM; `card` (cards.Card) or only its `capability`: the card
    planned for (budgets.machine_budget)."""
    own_format = folder.weight_format
    folder = assume_format_of(folder, assume_format)
    budget = shared_by(profile_budget(profile, vram_bytes, ram_bytes, card, capability), processes)
    ladder = ladder_from(profile.presets, preset)
    tried: dict[int, tuple[Profile, Plan]] = {}
    found = first_fit(folder, profile, ladder, budget, tried, options, layout)
    common = dict(budget=budget, requested=preset, asked=profile, weight_format=folder.weight_format,
                  assumed=folder.weight_format != own_format, folder=folder)
    if found is not None:
        fitted, plan = tried[found]
        estimate = estimate_run(folder, fitted, ladder[found], budget.card, options, layout)
        return Verdict(True, ladder[found], fitted, plan, requested_plan=tried[0][1] if found else None,
                       estimate=estimate, **common)
    fitted, plan = tried[0]
    name, suggested = suggest_profile(folder, profile, preset, budget)
    return Verdict(False, None, fitted, plan, suggested_profile=name, suggested_preset=suggested, **common)


def profile_budget(profile: Profile, vram_bytes: int | None, ram_bytes: int | None, card=None,
                   capability: tuple[int, int] | None = None) -> Budget:
    return machine_budget(profile.device, vram_bytes, ram_bytes, nominal_vram_bytes=int(profile.min_vram_gib * GiB),
                          card=card, capability=capability)


def first_fit(folder: ModelFolder, profile: Profile, ladder: list[Preset], budget: Budget,
              tried: dict[int, tuple[Profile, Plan]] | None = None, options=None, layout=None) -> int | None:
    """Index of the largest preset of `ladder` (largest first) that fits, or None; `tried` collects the fitted
    layout and plan of every preset planned, by index."""
    tried = {} if tried is None else tried

    def fits(i: int) -> bool:
        if i not in tried:
            tried[i] = fit_layout(folder, profile, ladder[i], budget, options, layout)
        return fits_some_way(tried[i][1], budget, tried[i][0], ladder[i])   # VAE tiles blended on the host too

    if fits(0):
        found = 0
    elif len(ladder) == 1 or not fits(len(ladder) - 1):
        return None
    else:
        lo, found = 0, len(ladder) - 1      # ladder[lo] does not fit, ladder[found] does
        while found - lo > 1:
            mid = (lo + found) // 2
            lo, found = (lo, mid) if fits(mid) else (mid, found)
    tried[found] = untiled_if_it_fits(folder, *tried[found], ladder[found], budget, options, layout)
    return found


def plan_fits(plan: Plan, budget: Budget) -> bool:
    return all(budget.phase_fits(p.peak_vram_bytes, p.peak_host_bytes) for p in plan.phases.values())


def fit_layout(folder: ModelFolder, profile: Profile, preset: Preset, budget: Budget,
               options=None, layout=None) -> tuple[Profile, Plan]:
    """`options`: the run's speed options (defaults.SpeedOptions; planned too); `layout` (parallel.Layout): one rank
    of a parallel run. `profile` with resident blocks and packed host copies lowered (upper bounds, never raised)
    until the plan of `preset` fits `budget`, and that plan; the plan may still exceed it when nothing is left."""
    profile, plan = fit_profile(folder, clamped(folder, profile), preset, budget.device_room(0), options=options,
                                layout=layout, capability=budget.capability)
    for _ in range(HOST_PASSES):
        if plan_fits(plan, budget) or not _only_adjustable_over(plan, budget):
            break
        phases = [plan.phases[name] for name in ADJUSTABLE if name in plan.phases]
        room = budget.device_room(max(p.peak_host_bytes for p in phases))
        excess = host_excess(phases, budget)
        if budget.device == "cpu" and profile.dit.resident_blocks and plan.phases["denoise"].peak_vram_bytes > room:
            lowered = profile                  # on the cpu, resident blocks give way first (they are RAM too)
        elif excess <= 0 or (lowered := less_packed(folder, profile, excess)) is None:
            break                              # the device is short, or there is no packed RAM left to give
        profile, plan = fit_profile(folder, lowered, preset, room, options=options, layout=layout,
                                    capability=budget.capability)
    return profile, plan


def untiled_if_it_fits(folder: ModelFolder, profile: Profile, plan: Plan, preset: Preset, budget: Budget,
                       options=None, layout=None) -> tuple[Profile, Plan]:
    """The largest VAE tile the plan fits: untiled (the release's numerics and the least decoder work) when the
    fitted layout fits with an untiled decode too, else the profile's tile (its OOM fallback halves it)."""
    if not profile.vae.tile or not plan_fits(plan, budget):
        return profile, plan
    untiled = replace(profile, vae=replace(profile.vae, tile=0, overlap=0))
    untiled, untiled_plan = fit_profile(folder, untiled, preset, budget.device_room(0), options=options,
                                        layout=layout, capability=budget.capability)
    return (untiled, untiled_plan) if plan_fits(untiled_plan, budget) else (profile, plan)


def _only_adjustable_over(plan: Plan, budget: Budget) -> bool:
    """Every phase over the budget is one that a layout change can shrink (else the preset cannot fit)."""
    over = [n for n, p in plan.phases.items() if not budget.phase_fits(p.peak_vram_bytes, p.peak_host_bytes)]
    return all(name in ADJUSTABLE for name in over)


def host_excess(phases: list, budget: Budget) -> int:
    """Host bytes over the budget in the worst of `phases` (on the cpu, device and host bytes together)."""
    if budget.device == "cpu":
        return max(p.peak_vram_bytes + p.peak_host_bytes for p in phases) - budget.host_bytes
    return max(p.peak_host_bytes for p in phases) - budget.host_bytes


def less_packed(folder: ModelFolder, profile: Profile, excess: int) -> Profile | None:
    """`profile` with `excess` fewer bytes of packed block copies (the blocks that no longer fit are read from
    disk), or None when nothing is packed."""
    packed = max(packed_bytes(folder, profile, "dit"), packed_bytes(folder, profile, "text_encoders"))
    if packed <= 0:
        return None
    lowered = replace(profile, memory=replace(profile.memory, packed_gb=max(0, packed - excess) / GiB))
    if any(packed_blocks(folder, lowered, section) for section in ("dit", "text_encoders")):
        return lowered
    sections = {s: replace(getattr(profile, s), source="disk") for s in ("dit", "text_encoders")}
    return replace(profile, memory=replace(profile.memory, packed_gb=0.0), **sections)   # nothing packs: all disk


def suggest_profile(folder: ModelFolder, profile: Profile, preset: Preset,
                    budget: Budget) -> tuple[str | None, Preset | None]:
    """The hungriest of the less hungry profiles of the same device kind with a preset (at most `preset`) that
    fits."""
    for other in candidates(profile):
        ladder = ladder_from(other.presets, preset)
        found = first_fit(folder, other, ladder, budget)
        if found is not None:
            return other.name, ladder[found]
    return None, None


def candidates(profile: Profile) -> list[Profile]:
    """Profiles of the same device kind sized for less (card, then RAM), largest first."""
    def size(p: Profile) -> tuple[float, float]:
        return p.min_vram_gib, p.memory.host_ram_gb
    others = [p for p in map(load_profile, list_profiles()) if p.device == profile.device and size(p) < size(profile)]
    return sorted(others, key=size, reverse=True)
