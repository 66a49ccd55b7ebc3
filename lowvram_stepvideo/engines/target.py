"""The compute device as the kernel choices see it (`Target`): the card a run has, or the card a plan is for.

Every choice of a kernel (attention.choose_attention, fast_matmul.choose_matmul) takes a Target, so a real run and
its memory plan choose with the same functions: a run passes `current_target(device)`, the planner
`planned_target(profile, capability)` (the capability of the card planned for: --card, --capability or this
machine's; what each capability runs is in cards.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..profiles import Profile


@dataclass(frozen=True)
class Target:
    """Compute capability (None without CUDA) and the device name (the device type, e.g. "cpu", without CUDA)."""
    capability: tuple[int, int] | None
    name: str = ""

    @property
    def cuda(self) -> bool:
        return self.capability is not None

    @property
    def device_type(self) -> str:
        return "cuda" if self.cuda else (self.name or "cpu")

    @property
    def geforce(self) -> bool:
        return "geforce" in self.name.lower() or self.name.lower().startswith("rtx ")


# The card a CUDA profile is planned for when no card is known: one with every kernel the tables know, so a plan
# counts what the profile asks for.
PROFILE_CUDA_TARGET = Target((9, 0), "the profile's CUDA card")


def current_target(device=None) -> Target:
    """The card of `device` (default: the machine's first CUDA device, else the CPU)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" or not torch.cuda.is_available():
        return Target(None, device.type)
    return Target(tuple(torch.cuda.get_device_capability(device)), torch.cuda.get_device_name(device))


def planned_target(profile: Profile, capability: tuple[int, int] | None = None, name: str = "") -> Target:
    """The card a memory plan of `profile` assumes: of `capability` when known, else PROFILE_CUDA_TARGET."""
    if profile.device != "cuda":
        return Target(None, profile.device or "cpu")
    return Target(tuple(capability), name or "the card planned for") if capability else PROFILE_CUDA_TARGET
