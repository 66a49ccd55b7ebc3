"""Where a run's decode blends its VAE tiles: on the device (engines/tiling.py: no tile leaves it, each chunk's
frames go out once), unless the plan says the device cannot hold a chunk's output.

The plan traces the decode blending on the device, so its decode phase counts the chunk's float32 blend there.
When that phase is over the device budget and would fit with the blend on the host (the blend moved to host RAM,
where a tile's float32 copy joins it), the run blends on the host as the tiles come out, as it did before. That
alternative is arithmetic on the traced plan, not a trace of its own: the device saves the blend (alive while
every tile after the first decodes), host RAM gains at most the blend, a tile's float32 copy (at most as large)
and the chunk in the compute dtype. With a single tile per frame nothing is blended and nothing changes.
"""
from __future__ import annotations

from dataclasses import replace

from ..engines.frame_copies import chunk_output_bytes
from ..engines.tiling import chunk_frames, tile_count
from ..pipeline.sampling import latent_shape
from ..profiles import Preset, Profile
from .budgets import Budget
from .plan import Plan

LATENTS_PER_CHUNK = 3


def blend_bytes(profile: Profile, preset: Preset) -> tuple[int, int]:
    """(device bytes a host blend frees, host bytes it takes) for `preset`'s decode under `profile`; (0, 0) when a
    frame is one tile (nothing is blended)."""
    shape = latent_shape(preset.frames, preset.height, preset.width)
    h, w = shape.shape[-2:]
    tile = profile.vae.tile or max(h, w)                                  # as PhasePipeline.decode picks them
    overlap = min(profile.vae.overlap, max(0, (min(tile, h, w) - 1) // 2))
    chunks = -(-shape.shape[1] // LATENTS_PER_CHUNK)
    if tile_count(shape.shape, tile, overlap, LATENTS_PER_CHUNK) <= chunks:
        return 0, 0
    frames = chunk_frames(LATENTS_PER_CHUNK)
    dtype = profile.torch_dtype
    whole = chunk_output_bytes(1, frames, shape.height, shape.width, dtype)   # blend + chunk + held frame
    blend = 4 * frames * 3 * shape.height * shape.width                        # the float32 blend alone
    return blend, blend + whole


def host_blended(plan: Plan, profile: Profile, preset: Preset) -> Plan:
    """`plan` with the decode's tiles blended on the host (see the module docstring)."""
    freed, taken = blend_bytes(profile, preset)
    decode = plan.phases.get("decode")
    if decode is None or not freed:
        return plan
    phases = dict(plan.phases, decode=replace(decode, peak_vram_bytes=decode.peak_vram_bytes - freed,
                                              peak_host_bytes=decode.peak_host_bytes + taken))
    return replace(plan, phases=phases)


def _fits(plan: Plan, budget: Budget) -> bool:
    return all(budget.phase_fits(p.peak_vram_bytes, p.peak_host_bytes) for p in plan.phases.values())


def blends_on_device(plan: Plan, budget: Budget, profile: Profile, preset: Preset) -> bool:
    """False when the plan fits only with the tiles blended on the host."""
    return _fits(plan, budget) or not _fits(host_blended(plan, profile, preset), budget)


def fits_some_way(plan: Plan, budget: Budget, profile: Profile, preset: Preset) -> bool:
    """The plan fits with the tiles blended on the device, or on the host."""
    return _fits(plan, budget) or _fits(host_blended(plan, profile, preset), budget)
