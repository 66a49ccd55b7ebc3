"""The compute device as the kernel choices see it (`Card`): the card a run has, or the card a plan is for.

Every choice of a kernel (attention.choose_attention, fast_matmul.choose_matmul) takes a Card, so a real run and
its memory plan choose with the same functions: a run passes `current_card(device)`, the planner
`target_card(profile)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..profiles import Profile


@dataclass(frozen=True)
class Card:
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
    def hopper(self) -> bool:
        return self.capability is not None and self.capability[0] == 9

    @property
    def consumer_8x(self) -> bool:
        return self.capability is not None and self.capability[0] == 8 and "geforce" in self.name.lower()


# The card a CUDA profile is planned for while profiles do not name their card: one with every kernel the tables
# know (fast_matmul.KERNEL_TABLE tops out at 8.9), so a plan counts what the profile asks for. A table of cards
# and their capabilities can replace this lookup.
PROFILE_CUDA_CARD = Card((9, 0), "the profile's CUDA card")


def current_card(device=None) -> Card:
    """The card of `device` (default: the machine's first CUDA device, else the CPU)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" or not torch.cuda.is_available():
        return Card(None, device.type)
    return Card(tuple(torch.cuda.get_device_capability(device)), torch.cuda.get_device_name(device))


def target_card(profile: Profile) -> Card:
    """The card a memory plan of `profile` assumes (see PROFILE_CUDA_CARD)."""
    return PROFILE_CUDA_CARD if profile.device == "cuda" else Card(None, profile.device or "cpu")
