"""The card table: what each GPU architecture can run (attention kernels, bf16, int8 / fp8 tensor-core matmuls) and
the common cards with their memory, compute capability and throughput. One table for `auto`, the profiles, the
memory plan and the time estimate.

Throughput. Dense tensor-core peaks are derived as SMs x boost clock x operations per clock per SM. The per-SM
rates (`Arch`) are the architecture whitepapers' per-SM tensor core rates; every card's SM count and boost clock are
its published specification (sources per group below). tests/test_cards.py checks the formula against the headline
figures NVIDIA publishes for a card of each architecture (T4 65 fp16 TFLOPS, A100 312, RTX 3090 71 bf16 with fp32
accumulate, RTX 4090 165.2, L4 121, RTX 5090 209.5, ...). Datacenter Hopper and Blackwell cards carry their datasheet
figures directly (their tensor peaks are quoted at a clock other than the boost clock).
- fp32 accumulate: what PyTorch's bf16/fp16 matmuls, flash-attn and torch._scaled_mm use. GeForce cards run it at
  half the rate of fp16 accumulate (whitepapers: RTX 3090 71 vs 142 TFLOPS, RTX 4090 165.2 vs 330.3, RTX 5090 209.5
  vs 419); workstation and datacenter cards at full rate. int8 (int32 accumulate) is full rate everywhere.
- Turing and Volta have no bf16 tensor cores: bf16 runs emulated there, and no time is estimated for it.

Attention kernels that exist per architecture (installed or not; the run imports what is there):
- flash-attn 2: Ampere, Ada, Hopper (its README: "Ampere, Ada, or Hopper GPUs ... Support for Turing GPUs is coming
  soon"); fp16 and bf16. Blackwell consumer (sm120): community builds only; datacenter Blackwell (sm100): none.
- flash-attn 3: Hopper.
- SageAttention 2: kernels for sm80 (also sm86), sm89, sm90 and sm120 (2.2); not Turing, not sm100.
- PyTorch SDPA: the flash kernel needs sm80-sm121 and fp16/bf16; the memory-efficient kernel runs from sm50 in fp16
  and fp32, in bf16 only from sm80 (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp). Elsewhere: the math
  kernel, which materialises the scores (in float32 for half inputs).
So on a Turing card no fused kernel takes bf16, while float16 has one (`attention_dtype` says which dtype its fused
kernels take): a bf16 run's attention runs on float16 copies of q, k and v there (engines/attention.py,
attention_precision), instead of SDPA's math kernel and its float32 scores.

Fast matmuls (engines/fast_matmul.py): int8 x int8 from 8.0, fp8 x fp8 from 8.9. fp8 row-wise scaled
torch._scaled_mm on sm12x arrived in PyTorch in 2025 and depends on the build; the run probes it and falls back.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

TFLOP = 1e12


@dataclass(frozen=True)
class Arch:
    """Dense operations per clock per SM (a multiply-add counts 2) of one architecture's tensor cores, and its
    CUDA cores' FP32 rate. 0 = no tensor-core support for that type."""
    name: str
    fp16: int          # fp16 / bf16 inputs, fp32 accumulate, full-rate parts (fp16 accumulate: the same rate)
    int8: int
    fp8: int
    fp32: int          # CUDA cores: 2 x FP32 lanes per SM
    bf16: bool         # bf16 tensor cores


# Per-SM rates: Volta V100 whitepaper (8 tensor cores x 64 FMA), Turing TU102 whitepaper (8 x 64 FMA, int8 2x),
# Ampere GA100 whitepaper (4 x 256 FMA dense), GA102 whitepaper (4 x 128 FMA dense), Ada whitepaper v2.01
# (as GA102, plus fp8 at 2x), RTX Blackwell whitepaper (as Ada for these types).
ARCHS = {
    (7, 0): Arch("Volta", 1024, 0, 0, 128, False),
    (7, 5): Arch("Turing", 1024, 2048, 0, 128, False),
    (8, 0): Arch("Ampere (GA100)", 2048, 4096, 0, 128, True),
    (8, 6): Arch("Ampere", 1024, 2048, 0, 256, True),
    (8, 9): Arch("Ada", 1024, 2048, 2048, 256, True),
    (9, 0): Arch("Hopper", 4096, 8192, 8192, 256, True),
    (10, 0): Arch("Blackwell (datacenter)", 0, 0, 0, 0, True),    # per-card datasheet figures only
    (12, 0): Arch("Blackwell", 1024, 2048, 2048, 256, True),
}
KINDS = ("bf16", "fp16", "int8", "fp8", "fp32")


@dataclass(frozen=True)
class Card:
    """One card: its published memory, compute capability, SMs and boost clock (or datasheet peaks), memory
    bandwidth and host link."""
    name: str
    vram_gib: float
    capability: tuple[int, int]
    sms: int = 0
    boost_mhz: int = 0
    memory_gbs: float = 0.0              # GB/s
    pcie: tuple[int, int] = (4, 16)      # (generation, lanes) of the link to the host
    geforce: bool = False                # fp32-accumulate tensor math at half rate
    datasheet_tflops: dict = field(default_factory=dict, hash=False, compare=False)   # kind -> dense peak
    device_names: tuple[str, ...] = ()   # what torch.cuda.get_device_name says, where it is not the name

    @property
    def arch(self) -> Arch:
        return ARCHS[self.capability]

    def tflops(self, kind: str) -> float:
        """Dense peak of `kind` ("bf16" | "fp16" | "int8" | "fp8" | "fp32"; int8 in TOPS) with fp32 (int32)
        accumulate; 0.0 where the card has no tensor cores for it (bf16 before Ampere, fp8 before Ada)."""
        if kind not in KINDS:
            raise ValueError(f"unknown throughput kind {kind!r}; one of {', '.join(KINDS)}")
        if self.datasheet_tflops:
            return float(self.datasheet_tflops.get(kind, 0.0))
        arch = self.arch
        per_sm = {"bf16": arch.fp16 if arch.bf16 else 0, "fp16": arch.fp16, "int8": arch.int8, "fp8": arch.fp8,
                  "fp32": arch.fp32}[kind]
        if self.geforce and kind in ("bf16", "fp16", "fp8"):
            per_sm //= 2
        return self.sms * self.boost_mhz * 1e6 * per_sm / TFLOP

    def tflops_fp16_accumulate(self) -> float:
        """fp16 inputs with fp16 accumulate (full rate on GeForce too): SageAttention's P x V on Ampere."""
        if self.datasheet_tflops:
            return self.tflops("fp16")
        return self.sms * self.boost_mhz * 1e6 * self.arch.fp16 / TFLOP

    @property
    def host_link_gbs(self) -> float:
        """Theoretical one-way PCIe bandwidth in GB/s (128b/130b encoding from gen 3 on)."""
        gen, lanes = self.pcie
        per_lane = {3: 0.985, 4: 1.969, 5: 3.938}[gen]
        return per_lane * lanes

    @property
    def capability_text(self) -> str:
        return f"{self.capability[0]}.{self.capability[1]}"


def _geforce(name, vram, cap, sms, mhz, gbs, pcie=(4, 16)) -> Card:
    return Card(name, vram, cap, sms, mhz, gbs, pcie, geforce=True)


def _pro(name, vram, cap, sms, mhz, gbs, pcie=(4, 16), names=()) -> Card:
    return Card(name, vram, cap, sms, mhz, gbs, pcie, device_names=names)


# SMs, boost clock (MHz), memory (GiB), bandwidth (GB/s) and host link as NVIDIA's product pages and launch
# specifications list them (reference boards, not factory-overclocked ones).
CARDS: tuple[Card, ...] = (
    # Volta: Tesla V100 SXM2 datasheet (125 tensor TFLOPS, 900 GB/s)
    # (SXM2 only: the PCIe card boosts to 1380 MHz and is not in the table)
    _pro("V100 16GB", 16, (7, 0), 80, 1530, 900, (3, 16), ("tesla v100-sxm2-16gb",)),
    _pro("V100 32GB", 32, (7, 0), 80, 1530, 900, (3, 16), ("tesla v100-sxm2-32gb",)),
    # Turing: GeForce RTX 20 series specifications, Turing whitepaper appendix; Tesla T4 datasheet (65 fp16 TFLOPS)
    _geforce("RTX 2060", 6, (7, 5), 30, 1680, 336, (3, 16)),
    _geforce("RTX 2060 12GB", 12, (7, 5), 34, 1650, 336, (3, 16)),
    _geforce("RTX 2060 Super", 8, (7, 5), 34, 1650, 448, (3, 16)),
    _geforce("RTX 2070", 8, (7, 5), 36, 1620, 448, (3, 16)),
    _geforce("RTX 2070 Super", 8, (7, 5), 40, 1770, 448, (3, 16)),
    _geforce("RTX 2080", 8, (7, 5), 46, 1710, 448, (3, 16)),
    _geforce("RTX 2080 Super", 8, (7, 5), 48, 1815, 496, (3, 16)),
    _geforce("RTX 2080 Ti", 11, (7, 5), 68, 1545, 616, (3, 16)),
    _pro("Titan RTX", 24, (7, 5), 72, 1770, 672, (3, 16), ("titan rtx",)),
    _pro("T4", 16, (7, 5), 40, 1590, 320, (3, 16), ("tesla t4",)),
    # Ampere GA100: A100 datasheet (312 bf16 TFLOPS, 624 int8 TOPS; 1555 / 2039 GB/s)
    _pro("A100 40GB", 40, (8, 0), 108, 1410, 1555, (4, 16), ("a100-sxm4-40gb", "a100-pcie-40gb")),
    _pro("A100 80GB", 80, (8, 0), 108, 1410, 2039, (4, 16), ("a100-sxm4-80gb", "a100 80gb pcie")),
    # Ampere GA10x: GeForce RTX 30 series specifications, GA102 whitepaper; RTX A4000-A6000, A10, A40 datasheets
    _geforce("RTX 3050", 8, (8, 6), 20, 1777, 224, (4, 8)),
    _geforce("RTX 3060", 12, (8, 6), 28, 1777, 360),
    _geforce("RTX 3060 Ti", 8, (8, 6), 38, 1665, 448),
    _geforce("RTX 3070", 8, (8, 6), 46, 1725, 448),
    _geforce("RTX 3070 Ti", 8, (8, 6), 48, 1770, 608),
    _geforce("RTX 3080", 10, (8, 6), 68, 1710, 760),
    _geforce("RTX 3080 12GB", 12, (8, 6), 70, 1710, 912),
    _geforce("RTX 3080 Ti", 12, (8, 6), 80, 1665, 912),
    _geforce("RTX 3090", 24, (8, 6), 82, 1695, 936),
    _geforce("RTX 3090 Ti", 24, (8, 6), 84, 1860, 1008),
    _pro("RTX A4000", 16, (8, 6), 48, 1560, 448),
    _pro("RTX A4500", 20, (8, 6), 56, 1650, 640),
    _pro("RTX A5000", 24, (8, 6), 64, 1695, 768),
    _pro("RTX A6000", 48, (8, 6), 84, 1800, 768),
    _pro("A10", 24, (8, 6), 72, 1695, 600),
    _pro("A40", 48, (8, 6), 84, 1740, 696),
    # Ada: GeForce RTX 40 series specifications, Ada whitepaper appendix; L4 and RTX 6000 Ada datasheets
    _geforce("RTX 4060", 8, (8, 9), 24, 2460, 272, (4, 8)),
    _geforce("RTX 4060 Ti", 8, (8, 9), 34, 2535, 288, (4, 8)),
    _geforce("RTX 4060 Ti 16GB", 16, (8, 9), 34, 2535, 288, (4, 8)),
    _geforce("RTX 4070", 12, (8, 9), 46, 2475, 504),
    _geforce("RTX 4070 Super", 12, (8, 9), 56, 2475, 504),
    _geforce("RTX 4070 Ti", 12, (8, 9), 60, 2610, 504),
    _geforce("RTX 4070 Ti Super", 16, (8, 9), 66, 2610, 672),
    _geforce("RTX 4080", 16, (8, 9), 76, 2505, 717),
    _geforce("RTX 4080 Super", 16, (8, 9), 80, 2550, 736),
    _geforce("RTX 4090", 24, (8, 9), 128, 2520, 1008),
    _pro("L4", 24, (8, 9), 58, 2040, 300),
    _pro("RTX 6000 Ada", 48, (8, 9), 142, 2505, 960, (4, 16), ("rtx 6000 ada generation",)),
    # Hopper: H100 / H200 datasheets (dense = half the quoted sparse figures)
    Card("H100 PCIe", 80, (9, 0), 114, 0, 2039, (5, 16), device_names=("h100 pcie",),
         datasheet_tflops={"bf16": 756, "fp16": 756, "int8": 1513, "fp8": 1513, "fp32": 51}),
    Card("H100 SXM", 80, (9, 0), 132, 0, 3350, (5, 16), device_names=("h100 80gb hbm3", "h100 sxm5 80gb"),
         datasheet_tflops={"bf16": 989, "fp16": 989, "int8": 1979, "fp8": 1979, "fp32": 67}),
    Card("H200", 141, (9, 0), 132, 0, 4800, (5, 16),
         datasheet_tflops={"bf16": 989, "fp16": 989, "int8": 1979, "fp8": 1979, "fp32": 67}),
    # Blackwell datacenter: HGX B200 specifications (per GPU, dense = half the sparse figures; 180 GB, 7.7 TB/s)
    Card("B200", 180, (10, 0), 0, 0, 7700, (5, 16),
         datasheet_tflops={"bf16": 2250, "fp16": 2250, "int8": 4500, "fp8": 4500, "fp32": 75}),
    # Blackwell consumer: GeForce RTX 50 series specifications, RTX Blackwell whitepaper
    _geforce("RTX 5060", 8, (12, 0), 30, 2497, 448, (5, 8)),
    _geforce("RTX 5060 Ti", 8, (12, 0), 36, 2572, 448, (5, 8)),
    _geforce("RTX 5060 Ti 16GB", 16, (12, 0), 36, 2572, 448, (5, 8)),
    _geforce("RTX 5070", 12, (12, 0), 48, 2512, 672, (5, 16)),
    _geforce("RTX 5070 Ti", 16, (12, 0), 70, 2452, 896, (5, 16)),
    _geforce("RTX 5080", 16, (12, 0), 84, 2617, 960, (5, 16)),
    _geforce("RTX 5090", 32, (12, 0), 170, 2407, 1792, (5, 16)),
)


# ---------------------------------------------------------------- what an architecture runs

@dataclass(frozen=True)
class Capabilities:
    """What a compute capability runs. `attention_kernels`: the fused attention kernels that exist for it
    (KERNELS names of engines/attention.py), "sdpa" always last."""
    capability: tuple[int, int]
    arch: str
    attention_kernels: tuple[str, ...]
    bf16_tensor_cores: bool
    bf16_fused_attention: bool      # some fused kernel takes bf16 (else SDPA runs bf16 on the math kernel)
    fp16_fused_attention: bool
    attention_dtype: str            # the dtype its fused attention takes: "bfloat16", else "float16"
    int8_mm: bool                   # the int8 x int8 fast matmul (fast_matmul.KERNEL_TABLE)
    fp8_mm: bool                    # the fp8 x fp8 fast matmul
    notes: tuple[str, ...] = ()


SAGE_ARCHS = {(8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (12, 0)}


def capabilities(capability: tuple[int, int]) -> Capabilities:
    """What a card of compute capability (major, minor) runs (see the module docstring)."""
    cap = tuple(capability)
    major = cap[0]
    kernels = (["flash3"] if major == 9 else []) + (["sage"] if cap in SAGE_ARCHS else [])
    kernels += ["flash2"] if (8, 0) <= cap < (10, 0) or major == 12 else []
    bf16_fused = cap >= (8, 0)
    notes = []
    if not bf16_fused:
        notes.append("no fused attention for bf16 (PyTorch's take fp16 here): a bf16 run's attention runs on "
                     "float16 copies on the memory-efficient kernel (v scaled by a power of two to fit)")
    if major == 12:
        notes.append("flash-attn 2: community builds for sm_120 only; fp8 row-wise torch._scaled_mm: recent "
                     "PyTorch builds (probed at run time)")
    if major == 10:
        notes.append("no flash-attn 2 or SageAttention kernels for sm_100: PyTorch SDPA (flash / cuDNN)")
    return Capabilities(cap, _arch_name(cap), tuple(kernels) + ("sdpa",), cap >= (8, 0), bf16_fused,
                        cap >= (5, 0), "bfloat16" if bf16_fused else "float16", cap >= (8, 0), cap >= (8, 9),
                        tuple(notes))


def _arch_name(cap: tuple[int, int]) -> str:
    if cap in ARCHS:
        return ARCHS[cap].name
    older = [c for c in ARCHS if c[0] == cap[0] and c <= cap]
    return ARCHS[max(older)].name if older else f"compute capability {cap[0]}.{cap[1]}"


def fused_attention(capability: tuple[int, int] | None, dtype: str) -> bool:
    """Does a fused attention kernel take `dtype` ("bfloat16" | "float16" | "float32") on this card? None = the
    CPU (PyTorch's CPU flash kernel takes all three)."""
    if capability is None:
        return True
    caps = capabilities(capability)
    return caps.bf16_fused_attention if dtype == "bfloat16" else caps.fp16_fused_attention


def attention_order(capability: tuple[int, int], geforce: bool) -> tuple[str, ...]:
    """The kernels `auto` tries on a card, in order: flash-attn 3 first on Hopper; SageAttention first on GeForce
    cards (their fp32-accumulate bf16 math runs at half rate, SageAttention's int8 QK^T does not), RTX 50xx
    included; flash-attn 2 first elsewhere. Only kernels that exist for the architecture; SDPA last."""
    kernels = capabilities(capability).attention_kernels
    if capability[0] == 9:
        first = ("flash3", "sage", "flash2")
    elif geforce:
        first = ("sage", "flash2")
    else:
        first = ("flash2", "sage")
    return tuple(k for k in first if k in kernels) + ("sdpa",)


# ---------------------------------------------------------------- finding a card

def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def card_by_name(name: str) -> Card | None:
    """The table's card named `name` (case, spaces and an "NVIDIA"/"GeForce" prefix do not matter)."""
    key = _key(re.sub(r"(?i)^\s*(nvidia\s+)?(geforce\s+)?", "", name))
    return next((c for c in CARDS if _key(c.name) == key), None)


def card_for_device(device_name: str, total_bytes: int | None = None) -> Card | None:
    """The table's card for what torch.cuda.get_device_name reports ("NVIDIA GeForce RTX 4090", "Tesla T4",
    "NVIDIA A100-SXM4-80GB"); variants that differ in memory only are told apart by `total_bytes`."""
    key = _key(re.sub(r"(?i)^\s*(nvidia\s+)?(geforce\s+|tesla\s+)?", "", device_name))
    full = _key(device_name)
    found = [c for c in CARDS if _key(c.name) == key or any(_key(n) in (key, full) for n in c.device_names)]
    found += [c for c in CARDS if c not in found and _key(re.sub(r"\s*\d+GB$", "", c.name)) == key]
    if not found:
        return None
    if total_bytes is None:
        return found[0]
    return min(found, key=lambda c: abs(c.vram_gib * 2**30 - total_bytes))


def card_names() -> list[str]:
    return [c.name for c in CARDS]


def parse_capability(text: str) -> tuple[int, int]:
    """'8.6' -> (8, 6); ValueError naming the expected form otherwise."""
    m = re.fullmatch(r"\s*(\d+)\.(\d)\s*", str(text))
    if not m or not 3 <= int(m[1]) <= 15:
        raise ValueError(f"--capability {text!r}: expected a compute capability like 8.6 (RTX 30xx), 7.5 (Turing), "
                         "8.9 (RTX 40xx), 12.0 (RTX 50xx)")
    return int(m[1]), int(m[2])


def describe_card(card: Card) -> dict:
    """Plain data of a card for --list-cards --json and the dry-run's JSON."""
    caps = capabilities(card.capability)
    return {"name": card.name, "vram_gib": card.vram_gib, "capability": card.capability_text, "arch": card.arch.name,
            "tflops": {k: round(card.tflops(k), 1) for k in KINDS}, "memory_gbs": card.memory_gbs,
            "pcie": f"{card.pcie[0]}.0 x{card.pcie[1]}", "geforce": card.geforce,
            "attention_kernels": list(caps.attention_kernels), "bf16_fused_attention": caps.bf16_fused_attention,
            "int8_mm": caps.int8_mm, "fp8_mm": caps.fp8_mm, "notes": list(caps.notes)}


def card_table() -> str:
    """--list-cards: one line per card."""
    rows = ["dense tensor-core peaks with fp32 accumulate (TFLOPS; int8 in TOPS), '-' = no tensor cores for it",
            f"{'card':<18} {'VRAM':>6} {'cc':>5} {'bf16':>6} {'fp16':>6} {'int8':>6} {'fp8':>6} {'GB/s':>6} "
            f"{'PCIe':>7}  attention kernels, in auto's order"]
    for c in CARDS:
        peaks = " ".join(f"{c.tflops(k):6.0f}" if c.tflops(k) else f"{'-':>6}" for k in ("bf16", "fp16", "int8", "fp8"))
        rows.append(f"{c.name:<18} {c.vram_gib:>3g} GB {c.capability_text:>5} {peaks} {c.memory_gbs:>6g} "
                    f"{c.pcie[0]}.0 x{c.pcie[1]:<2}  {', '.join(attention_order(c.capability, c.geforce))}")
    rows.append("Volta and Turing (7.x) have no bf16 tensor cores and no fused bf16 attention: a bf16 run's attention "
                "runs in float16 there (float16 has both)")
    return "\n".join(rows)
