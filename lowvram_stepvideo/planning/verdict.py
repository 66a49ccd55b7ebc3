"""The fit verdict (what fit.check_fit decides) and its human form: per phase, device and host peaks against
their budgets, what fitting lowered, then one line."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..loading.model_folder import ModelFolder
from ..profiles import Preset, Profile
from .budgets import Budget
from .estimate import Estimate, estimate_line
from .byte_count import fmt_bytes
from .plan import Plan
from ..engines.attention import attention_precision, math_attention
from .stacks import block_layout, clamped

OVER = "*"


@dataclass
class Verdict:
    fits: bool
    preset: Preset | None                 # what would actually run (None: nothing on the ladder fits)
    profile: Profile                      # the fitted layout of `preset` (of the requested preset if none fits)
    plan: Plan                            # the plan of `preset` (of the requested preset if none fits)
    budget: Budget
    requested: Preset
    asked: Profile                        # the profile as given, before fitting
    weight_format: str                    # of the planned weights ("int8" when assumed with --assume-format)
    assumed: bool = False
    suggested_profile: str | None = None  # a profile that would fit when none of this one's presets does
    suggested_preset: Preset | None = None
    requested_plan: Plan | None = None    # the requested preset's plan when a smaller one runs
    folder: ModelFolder | None = field(default=None, repr=False)   # the planned folder (for the layout)
    estimate: Estimate | None = None      # how long `preset` takes on the budget's card (estimate.py)

    def to_dict(self) -> dict:
        where = block_layout(self.folder, self.profile)
        return {"fits": self.fits, "preset": None if self.preset is None else str(self.preset),
                "profile": self.profile.name, "requested_preset": str(self.requested),
                "budget_vram_bytes": self.budget.vram_bytes, "budget_host_bytes": self.budget.host_bytes,
                "peak_vram_bytes": self.plan.peak_vram_bytes, "peak_host_bytes": self.plan.peak_host_bytes,
                "phases": {name: {"peak_vram_bytes": p.peak_vram_bytes, "peak_host_bytes": p.peak_host_bytes}
                           for name, p in self.plan.phases.items()},
                "device": self.budget.device, "budget_vram_from": self.budget.vram_from,
                "budget_host_from": self.budget.host_from, "weight_format": self.weight_format,
                "assumed_format": self.assumed, "layout": where,
                "dit_resident_blocks": where["dit"]["resident"], "suggested_profile": self.suggested_profile,
                "suggested_preset": None if self.suggested_preset is None else str(self.suggested_preset),
                **card_fields(self), "estimate_seconds": estimate_seconds(self.estimate),
                "estimate": None if self.estimate is None else self.estimate.to_dict()}

    def report(self) -> str:
        return report(self)


def report(v: Verdict) -> str:
    lines = []
    if v.requested_plan is not None:
        lines += [_table(v, v.requested_plan, str(v.requested)), ""]
    lines += [_table(v, v.plan, str(v.preset or v.requested)),
              f"budget: device {v.budget.vram_from}; host {v.budget.host_from}" if v.budget.device == "cuda"
              else f"budget: RAM {v.budget.host_from} (on the cpu, compute and host copies share it)"]
    lowered = _lowered(v)
    if lowered:
        lines.append("fitted: " + lowered)
    if v.budget.device == "cuda":
        lines.append(card_line(v))
    lines.append(verdict_line(v))
    if v.estimate is not None:
        lines.append(estimate_line(v.estimate, v.preset))
    elif v.fits and v.budget.device == "cuda":
        lines.append("estimate: none (the time is estimated for a card of --list-cards)")
    return "\n".join(lines)


def _table(v: Verdict, plan: Plan, preset: str) -> str:
    fmt = f"{v.weight_format} weights" + (" (assumed: --assume-format)" if v.assumed else "")
    rows = [f"memory plan: profile {v.profile.name}, {preset} (frames x height x width), {fmt}"]
    b = v.budget
    if b.device == "cpu":
        rows.append(f"{'phase':<8} {'RAM':>11} {'host RAM':>11} {'total':>11}")
        for name, p in plan.phases.items():
            total = p.peak_vram_bytes + p.peak_host_bytes
            rows.append(f"{name:<8} {_b(p.peak_vram_bytes)} {_b(p.peak_host_bytes)} {_b(total, b.host_bytes)}")
        rows.append(f"{'budget':<8} {'':>11} {'':>11} {_b(b.host_bytes)}")
    else:
        rows.append(f"{'phase':<8} {'VRAM':>11} {'host RAM':>11}")
        for name, p in plan.phases.items():
            rows.append(f"{name:<8} {_b(p.peak_vram_bytes, b.vram_bytes)} {_b(p.peak_host_bytes, b.host_bytes)}")
        rows.append(f"{'budget':<8} {_b(b.vram_bytes)} {_b(b.host_bytes)}")
    if any(OVER in r for r in rows[2:]):
        rows.append(f"{OVER} over budget")
    return "\n".join(r.rstrip() for r in rows)


def _b(n: int, limit: int | None = None) -> str:
    mark = OVER if limit is not None and n > limit else " "
    return f"{fmt_bytes(n):>10}{mark}"


def _lowered(v: Verdict) -> str:
    """What fitting changed against the profile as given (resident blocks, packed RAM, sources)."""
    a, f, out = clamped(v.folder, v.asked), v.profile, []     # a count above the stack's size is not a lowering
    if f.dit.resident_blocks < a.dit.resident_blocks:
        out.append(f"DiT resident blocks {a.dit.resident_blocks} -> {f.dit.resident_blocks}")
    if f.text_encoders.placement != a.text_encoders.placement:
        out.append("step_llm streamed block by block instead of whole")
    elif f.text_encoders.resident_blocks < a.text_encoders.resident_blocks:
        out.append(f"step_llm resident blocks {a.text_encoders.resident_blocks} -> {f.text_encoders.resident_blocks}")
    if f.memory.packed_gb < a.memory.packed_gb:
        out.append(f"packed RAM {a.memory.packed_gb:g} -> {f.memory.packed_gb:.1f} GiB")
    if f.dit.source != a.dit.source:
        out.append(f"DiT blocks from {f.dit.source} instead of {a.dit.source}")
    return "; ".join(out)


def verdict_line(v: Verdict) -> str:
    budget = _budget_words(v)
    if v.fits and v.requested_plan is None:
        return f"verdict: fits {budget}: {v.preset} with profile {v.profile.name}; {where_blocks(v)}"
    if v.fits:
        return (f"verdict: {v.requested} does not fit {budget}; the largest preset that does is {v.preset} "
                f"(profile {v.profile.name}; {where_blocks(v)})")
    line = f"verdict: does not fit {budget}: no preset of profile {v.profile.name} from {v.requested} down"
    if v.suggested_profile:
        return line + f"; profile {v.suggested_profile} would, at {v.suggested_preset} (--profile {v.suggested_profile})"
    return line + "; nor does any smaller profile (a bigger card or more RAM is needed)"


def _budget_words(v: Verdict) -> str:
    b = v.budget
    if b.device == "cpu":
        return f"in {fmt_bytes(b.host_bytes)} of RAM"
    return f"in {fmt_bytes(b.vram_bytes)} of VRAM and {fmt_bytes(b.host_bytes)} of RAM"


def where_blocks(v: Verdict) -> str:
    parts = []
    for name, stack in block_layout(v.folder, v.profile).items():
        label = "DiT" if name == "dit" else "step_llm"
        held = "on the device" if v.budget.device == "cuda" else "held in RAM"
        if "placement" in stack:
            parts.append(f"{label} whole {held}")
            continue
        others = [f"{stack['packed_in_ram']} from packed RAM"] if stack["packed_in_ram"] else []
        others += [f"{stack['from_disk']} read from disk"] if stack["from_disk"] else []
        rest = f", {' and '.join(others)} each pass (prefetch {stack['prefetch']})" if others else ""
        parts.append(f"{label} {stack['resident']} of {stack['blocks']} blocks {held}{rest}")
    return "; ".join(parts)


def card_fields(v: Verdict) -> dict:
    b = v.budget
    cap = None if b.capability is None else f"{b.capability[0]}.{b.capability[1]}"
    return {"card": None if b.card is None else b.card.name, "capability": cap,
            "attention_planned": _planned_attention(v)}


def _planned_attention(v: Verdict) -> str:
    """"math" (SDPA's math kernel and its scores), "float16" (a fused kernel on float16 copies: the card has none for
    the compute dtype) or "fused"."""
    if v.budget.device != "cuda":
        return "fused"
    if math_attention(v.budget.capability, v.profile.torch_dtype):
        return "math"
    return "float16" if attention_precision(v.budget.capability, v.profile.torch_dtype) else "fused"


def card_line(v: Verdict) -> str:
    """Which card was planned for and which attention kernel the plan counts."""
    b = v.budget
    card = b.card.name if b.card else "the card"
    if b.capability is None:
        return (f"card: {card} (compute capability not known: attention planned on a fused kernel; --card NAME or "
                "--capability X.Y plans another)")
    cap = f"compute capability {b.capability[0]}.{b.capability[1]}"
    planned = _planned_attention(v)
    if planned == "math":
        return (f"card: {card} ({cap}) has no fused attention kernel for {v.profile.compute_dtype}: the DiT's "
                "attention is planned on SDPA's math kernel, which holds the float32 scores")
    if planned == "float16":
        return (f"card: {card} ({cap}) has no fused attention kernel for {v.profile.compute_dtype}: the DiT's "
                "attention runs on its float16 kernel (q, k, v copied to float16, v scaled by a power of two to "
                "fit), and the plan counts the copies")
    return f"card: {card} ({cap}): attention planned on a fused kernel"


def estimate_seconds(est: Estimate | None) -> dict | None:
    """Seconds per phase and "total" (None where not estimated), for --json."""
    if est is None:
        return None
    seconds = est.to_dict()["seconds"]
    return {**seconds, "total": est.to_dict()["total_seconds"]}
