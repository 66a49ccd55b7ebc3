"""The block stacks of a folder (the DiT's and step_llm's) under a profile: their size, and which blocks stay on
the device, which have a packed copy in host RAM and which are read from disk."""
from __future__ import annotations

import functools
from dataclasses import replace

import torch

from ..engines.host_store import HostArenas
from ..engines.streaming import ARENA_BYTES, packed_budget_bytes
from ..loading.model_folder import ModelFolder
from ..profiles import Profile
from .planned_models import planned_model


def clamped(folder: ModelFolder, profile: Profile) -> Profile:
    """Resident block counts capped at the stack's size (so that lowering them changes the plan at once)."""
    dit_blocks, _ = stack_size(folder, "transformer", profile.torch_dtype)
    profile = replace(profile, dit=replace(profile.dit, resident_blocks=min(profile.dit.resident_blocks, dit_blocks)))
    te = profile.text_encoders
    if te.placement == "stream":
        llm_blocks, _ = stack_size(folder, "step_llm", profile.torch_dtype)
        profile = replace(profile, text_encoders=replace(te, resident_blocks=min(te.resident_blocks, llm_blocks)))
    return profile


def packed_blocks(folder: ModelFolder, profile: Profile, section: str) -> int:
    """Streamed blocks of `section` ("dit" | "text_encoders") that have a packed copy in host RAM."""
    settings = getattr(profile, section)
    if settings.source != "ram" or (section == "text_encoders" and settings.placement != "stream"):
        return 0
    count, block = stack_size(folder, _component(section), profile.torch_dtype)
    streamed = max(0, count - settings.resident_blocks)
    return HostArenas(block, ARENA_BYTES, pin=False).fit(packed_budget_bytes(profile), streamed)


def packed_bytes(folder: ModelFolder, profile: Profile, section: str) -> int:
    _, block = stack_size(folder, _component(section), profile.torch_dtype)
    return HostArenas(block, ARENA_BYTES, pin=False).cost(packed_blocks(folder, profile, section))


@functools.lru_cache(maxsize=16)
def stack_size(folder: ModelFolder, component: str, dtype: torch.dtype) -> tuple[int, int]:
    """(blocks, bytes of one block as streamed) of the DiT or step_llm, from the weight index alone."""
    _, shape = planned_model(folder, component, dtype)     # one block built: identical blocks are the same size
    return shape.blocks, shape.block_bytes


def _component(section: str) -> str:
    return "transformer" if section == "dit" else "step_llm"


def block_layout(folder: ModelFolder, profile: Profile) -> dict:
    """Where the DiT's and step_llm's blocks live under `profile`."""
    where = {}
    for section in ("dit", "text_encoders"):
        settings = getattr(profile, section)
        if section == "text_encoders" and settings.placement == "device":
            where["step_llm"] = {"placement": "whole"}
            continue
        count, _ = stack_size(folder, _component(section), profile.torch_dtype)
        resident = min(settings.resident_blocks, count)
        packed = packed_blocks(folder, profile, section)
        where["dit" if section == "dit" else "step_llm"] = {
            "blocks": count, "resident": resident, "packed_in_ram": packed,
            "from_disk": count - resident - packed, "prefetch": settings.prefetch}
    return where
