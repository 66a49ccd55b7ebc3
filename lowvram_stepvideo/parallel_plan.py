"""The memory plan of one rank of a parallel run: the same planned pipeline with the parallel engines attached
(their buffers counted, nothing sent). Activations shrink with the sequence split (and a CFG split runs one branch
per rank), the weights each rank places do not."""
from __future__ import annotations

import dataclasses

from .parallel import Layout, Parallel, attach
from .plan import Plan, PlanningRuntime, evaluate, trace
from .profiles import Preset, Profile


class RankPlanningRuntime(PlanningRuntime):
    def __init__(self, folder, profile: Profile, layout: Layout, options=None):
        super().__init__(folder, profile, options)   # folder: already as the assumed format (plan.trace)
        self.par = Parallel.planned(layout)

    def load(self, component: str, dtype):
        model = super().load(component, dtype)
        if component == "transformer":
            attach(getattr(model, "model", model), self.par)   # the network inside the plan's Replaying wrapper
        return model


def plan_per_rank(folder, profile: Profile, preset: Preset, layout: Layout,
                  assume_format: str | None = None, options=None) -> Plan:
    """Peak device and host bytes per phase on rank 0 of `layout` (the largest: it also runs the text phase and
    the decode)."""
    if layout.cfg == 2:
        profile = dataclasses.replace(profile, cfg_mode="batch")   # as ParallelRuntime runs it
    return evaluate(trace(folder, profile, preset, assume_format, options, layout), profile, preset)
