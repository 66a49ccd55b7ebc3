"""What the machine gives a run: the VRAM and host-RAM budgets the memory plan is checked against.

VRAM. Read from the card: the free memory `torch.cuda.mem_get_info` reports once the CUDA context exists (so the
context, a desktop and other processes are already out of it), minus `VRAM_RESERVE`. Given as a card size
(`--vram-gib N`, "what would an N GiB card do?"): N minus `CUDA_CONTEXT_BYTES` minus the same reserve.
  - CUDA_CONTEXT_BYTES (0.5 GiB): the context, kernels and cuBLAS/cuDNN handles live outside torch's allocator
    (0.3-0.6 GiB on current cards and drivers). Default until bench/plan_vs_gpu.py measures it on a GPU.
  - VRAM_RESERVE (3% of the card, at least 0.3 GiB): kernels' workspaces and allocator fragmentation, which
    the plan's count of live tensors does not see. `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` (set by
    `use_expandable_segments` unless the user chose a value) keeps fragmentation small enough for this. Default
    until bench/plan_vs_gpu.py measures `max_memory_reserved` against the plan on a GPU.
  An 8 GiB card thus gets 8 - 0.5 - 0.3 = 7.2 GiB; a 24 GiB card 24 - 0.5 - 0.72 = 22.8 GiB.

Host RAM. Read from the machine: MemAvailable (what the kernel can give without swapping, page cache counted as
free) minus HOST_MARGIN_AVAILABLE (1 GiB, for what the run allocates outside the plan: the Python heap, file
buffers). Given as a machine size (`--ram-gib N`): N minus max(2 GiB, 10%) for the OS, a desktop and the Python
process itself.

On a CPU profile the compute "device" is RAM too: device and host bytes of a phase are added and checked against
the host budget.

The card. A budget also names the card it is for (engines/cards.py): this machine's, read from CUDA, or the one
planned for (`--card NAME`, or `--capability X.Y` with `--vram-gib`). Its compute capability decides which attention
kernel the plan counts; the table's throughput figures give the time estimate.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, replace

from ..engines.cards import Card, card_for_device, fused_attention
from ..engines.host_store import available_ram_bytes
from ..errors import ConfigError
from ..profiles import Profile, list_profiles, load_profile, profiles_dir, with_overrides

GiB = 2**30
CUDA_CONTEXT_BYTES = GiB // 2
VRAM_RESERVE_FRACTION, VRAM_RESERVE_MIN = 0.03, int(0.3 * GiB)
HOST_MARGIN_AVAILABLE = GiB
HOST_MARGIN_FRACTION, HOST_MARGIN_MIN = 0.10, 2 * GiB
ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"


@dataclass(frozen=True)
class Budget:
    """Bytes a run may use on the compute device and in host RAM, and where each number came from."""
    device: str               # "cuda" | "cpu" (on cpu, vram_bytes == host_bytes: both are RAM)
    vram_bytes: int
    host_bytes: int
    vram_from: str            # e.g. "8.0 GiB card (--vram-gib) - 0.8 GiB reserve"
    host_from: str
    capability: tuple[int, int] | None = None   # of the card (None: the CPU, or not known)
    card: Card | None = None                    # the card table's entry, where known

    def phase_fits(self, vram: int, host: int) -> bool:
        if self.device == "cpu":
            return vram + host <= self.host_bytes
        return vram <= self.vram_bytes and host <= self.host_bytes

    def device_room(self, host: int) -> int:
        """Device bytes left for a phase that holds `host` bytes of host RAM."""
        return self.host_bytes - host if self.device == "cpu" else self.vram_bytes


def vram_reserve(card_bytes: int) -> int:
    return max(VRAM_RESERVE_MIN, int(VRAM_RESERVE_FRACTION * card_bytes))


def vram_budget(card_bytes: int | None = None) -> tuple[int, str] | None:
    """(budget, how it was derived) for a card of `card_bytes` total memory, or for this machine's card 0 (None
    when there is no CUDA device)."""
    if card_bytes is not None:
        reserve = CUDA_CONTEXT_BYTES + vram_reserve(card_bytes)
        return card_bytes - reserve, f"{_gib(card_bytes)} card - {_gib(reserve)} context and reserve"
    free_total = cuda_free_and_total()
    if free_total is None:
        return None
    free, total = free_total
    reserve = vram_reserve(total)
    return free - reserve, f"{_gib(free)} free of {_gib(total)} - {_gib(reserve)} reserve"


def host_budget(ram_bytes: int | None = None) -> tuple[int, str]:
    """(budget, how it was derived) for a machine with `ram_bytes` of RAM, or for this machine now."""
    if ram_bytes is not None:
        margin = max(HOST_MARGIN_MIN, int(HOST_MARGIN_FRACTION * ram_bytes))
        return ram_bytes - margin, f"{_gib(ram_bytes)} RAM - {_gib(margin)} for the OS"
    available = available_ram_bytes()
    return available - HOST_MARGIN_AVAILABLE, f"{_gib(available)} available - {_gib(HOST_MARGIN_AVAILABLE)} margin"


def machine_budget(device: str, vram_bytes: int | None = None, ram_bytes: int | None = None,
                   nominal_vram_bytes: int | None = None, card: Card | None = None,
                   capability: tuple[int, int] | None = None) -> Budget:
    """The budget of this machine, or of one with a card of `vram_bytes` and `ram_bytes` of RAM. A cuda profile
    planned on a machine without CUDA (and no `vram_bytes`) gets a card of `nominal_vram_bytes`. `card` (or only its
    `capability`): the card planned for; none given, this machine's card when the budget is read from it."""
    host, host_from = host_budget(ram_bytes)
    if device == "cpu":
        return Budget("cpu", host, host, host_from, host_from)
    capability = card.capability if card else capability
    vram = vram_budget(vram_bytes)
    if vram is None:
        nominal = nominal_vram_bytes or 0
        vram = vram_budget(nominal)
        vram = (vram[0], vram[1] + " (no CUDA device here: the profile's nominal card; --vram-gib N for another)")
    elif vram_bytes is None and card is None and capability is None:
        card, capability = this_card()
    if card is not None:     # "24.0 GiB RTX 4090 - ..." for a card planned for, "RTX 4090: 23.1 GiB free ..." here
        named = vram[1].replace(" card", f" {card.name}", 1)
        vram = (vram[0], named if named != vram[1] else f"{card.name}: {vram[1]}")
    return Budget("cuda", vram[0], host, vram[1], host_from, capability, card)


def shared_by(budget: Budget, processes: int) -> Budget:
    """`budget` for one of `processes` processes of a parallel run on one machine: each has its own card, and they
    share the host RAM evenly (each packs its own copy of the blocks it streams)."""
    if processes <= 1:
        return budget
    host = budget.host_bytes // processes
    return replace(budget, host_bytes=host,
                   host_from=f"{budget.host_from}, shared by {processes} processes: {host / GiB:.1f} GiB each")


def this_card() -> tuple[Card | None, tuple[int, int] | None]:
    """(the card table's entry, compute capability) of the current CUDA device; (None, None) without CUDA."""
    import torch
    if not torch.cuda.is_available():
        return None, None
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return card_for_device(props.name, props.total_memory), (props.major, props.minor)


def cuda_free_and_total() -> tuple[int, int] | None:
    """(free, total) bytes of the current CUDA device (card 0, or this rank's under torchrun) after context
    creation, or None without CUDA."""
    use_expandable_segments()
    import torch
    if not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info(torch.cuda.current_device())


def use_expandable_segments() -> None:
    """Ask torch's CUDA allocator for expandable segments (less fragmentation) unless the user set
    PYTORCH_CUDA_ALLOC_CONF. Only effective before CUDA initialises; a no-op off Linux (not supported there)."""
    if ALLOC_CONF in os.environ or not sys.platform.startswith("linux"):
        return
    import torch
    if torch.cuda.is_initialized():
        return
    os.environ[ALLOC_CONF] = "expandable_segments:True"


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def auto_profile(vram_bytes: int | None, ram_bytes: int | None = None) -> Profile:
    """The profile `--profile auto` picks for a card of `vram_bytes` (None: no CUDA device) in a machine with
    `ram_bytes` of RAM (None: this machine's available RAM); `auto_reason` says why."""
    return auto_choice(vram_bytes, ram_bytes)[0]


def auto_reason(vram_bytes: int | None, ram_bytes: int | None = None) -> str:
    return auto_choice(vram_bytes, ram_bytes)[1]


def auto_choice(vram_bytes: int | None, ram_bytes: int | None = None,
                capability: tuple[int, int] | None = None) -> tuple[Profile, str]:
    """By VRAM: the largest cuda tier whose min_vram_gib fits the card (the smallest for a card below all of
    them). By RAM: when the host-RAM budget (budgets.host_budget) is below the tier's host_ram_gb, its memory is
    scaled down to the budget (packed copies in the same proportion; blocks that no longer fit come from disk).
    Without CUDA: the cpu tier with the largest host_ram_gb within the budget (the smallest when none is). The card's
    `capability`, where known, is said with what it means for the tier's compute dtype (cards.py)."""
    profile, why = _auto_choice(vram_bytes, ram_bytes)
    if capability is not None and profile.device == "cuda" and not fused_attention(capability, profile.compute_dtype):
        runs = ("in float16 on its fused kernel" if fused_attention(capability, "float16") else
                "on the math kernel")
        why += (f"; compute capability {capability[0]}.{capability[1]} has no fused attention for "
                f"{profile.compute_dtype}: its attention runs {runs}, and the plan counts it")
    return profile, why


def _auto_choice(vram_bytes: int | None, ram_bytes: int | None) -> tuple[Profile, str]:
    ram, ram_from = host_budget(ram_bytes)
    profiles = list(map(load_profile, list_profiles()))
    if vram_bytes is None:
        return _auto_cpu([p for p in profiles if p.device == "cpu"], ram, ram_from)
    tiers = sorted((p for p in profiles if p.device == "cuda"), key=lambda p: p.min_vram_gib)
    if not tiers:
        raise ConfigError(f"{profiles_dir()}: no cuda profiles found; pass --profile explicitly")
    fitting = [p for p in tiers if p.min_vram_gib * GiB <= vram_bytes]
    tier = fitting[-1] if fitting else tiers[0]
    why = (f"the largest tier for a {vram_bytes / GiB:.1f} GiB card" if fitting else
           f"the smallest tier; the {vram_bytes / GiB:.1f} GiB card is below every tier's min_vram_gib")
    if tier.memory.host_ram_gb * GiB <= ram:
        return tier, f"auto: {tier.name}, {why}; its {tier.memory.host_ram_gb:g} GiB of host RAM fit ({ram_from})"
    scaled = _scaled_to_ram(tier, ram)
    return scaled, (f"auto: {tier.name}, {why}; its {tier.memory.host_ram_gb:g} GiB of host RAM exceed this "
                    f"machine's {ram / GiB:.1f} GiB ({ram_from}): packed block copies {tier.memory.packed_gb:g} -> "
                    f"{scaled.memory.packed_gb:.1f} GiB, the other blocks are read from disk")


def _scaled_to_ram(tier: Profile, ram: int) -> Profile:
    host = max(0.0, math.floor(ram / GiB * 10) / 10)          # GiB, rounded down to 0.1
    share = tier.memory.packed_gb / tier.memory.host_ram_gb if tier.memory.host_ram_gb else 0.0
    packed = math.floor(share * host * 10) / 10
    disk = {"dit_source": "disk", "text_encoders_source": "disk"} if packed < 1 else {}
    return with_overrides(tier, memory_host_ram_gb=host, memory_packed_gb=packed, **disk)


def _auto_cpu(tiers: list[Profile], ram: int, ram_from: str) -> tuple[Profile, str]:
    if not tiers:
        raise ConfigError(f"{profiles_dir()}: no cpu profiles found; pass --profile explicitly")
    tiers.sort(key=lambda p: p.memory.host_ram_gb)
    fitting = [p for p in tiers if p.memory.host_ram_gb * GiB <= ram]
    if fitting:
        tier = fitting[-1]
        return tier, (f"auto: {tier.name}, no CUDA device; the largest cpu tier whose {tier.memory.host_ram_gb:g} "
                      f"GiB of host RAM fit ({ram_from})")
    tier = tiers[0]
    return tier, (f"auto: {tier.name}, no CUDA device; even the smallest cpu tier's {tier.memory.host_ram_gb:g} "
                  f"GiB of host RAM exceed this machine's {ram / GiB:.1f} GiB ({ram_from})")
