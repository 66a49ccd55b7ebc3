"""Keeping the DiT warm between the videos of a batch, the web page or an API session (pipeline/warm.py): whether
the memory plan says RAM holds it, decided for each video before its text phase, and said in the log.

The plan is the run's own (planning/plan.py) with the DiT kept: its packed host copy (and on a CPU its weights)
counted in every phase but the denoising. The budget is this machine's, with the RAM the DiT kept from the last
video already holds given back to it (MemAvailable no longer counts it). When the plan does not fit, or the next
video runs another DiT (other weights, dtype, device or placement), the kept one is dropped before the text phase.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from ..pipeline.phases import PhasePipeline
from ..pipeline.warm import KeptDiT
from ..planning.byte_count import fmt_bytes
from ..planning.fit import plan_fits, profile_budget
from ..planning.plan import plan_memory
from ..profiles import Preset

__all__ = ["KeptDiT", "keep_warm", "ram_held"]


def ram_held(pipe: PhasePipeline) -> int:
    """Host bytes the DiT kept from the last video holds now (0 when none is kept)."""
    kept = getattr(pipe.runtime, "kept", None)
    return kept.held_bytes() if kept is not None else 0


def keep_warm(pipe: PhasePipeline, preset: Preset, log: Callable[[str], None]) -> None:
    """Decide whether `pipe`'s DiT is kept after this video's denoising (see the module docstring)."""
    kept: KeptDiT | None = getattr(pipe.runtime, "kept", None)
    if kept is None:
        return
    if kept.model is not None and kept.key != pipe.runtime.dit_key(pipe.dtype):
        kept.drop()                              # another DiT runs next: free its RAM before the text phase
    budget = profile_budget(pipe.profile, None, None)
    budget = replace(budget, host_bytes=budget.host_bytes + kept.held_bytes())
    plan = plan_memory(pipe.folder, pipe.profile, preset, options=pipe.options, capability=budget.capability,
                       keep_dit=True)
    allowed = plan_fits(plan, budget)
    if not allowed:
        kept.drop()
    kept.allowed, kept.stays_bytes = allowed, plan.kept_dit_bytes if allowed else 0
    if kept.said != allowed:
        kept.said = allowed
        size = fmt_bytes(plan.kept_dit_bytes)
        log(f"keep warm: the DiT stays in RAM between videos ({size}; the plan fits it beside every phase)"
            if allowed else
            f"keep warm: off, the plan with the DiT kept ({size}) is over the budget ({budget.host_from}); it is "
            "loaded again for each video")
