"""The memory plan of one rank of a parallel run: the same planned pipeline with the parallel engines attached
(their buffers counted, nothing sent). Activations shrink with the sequence split (and a CFG split runs one branch
per rank), the weights each rank places do not."""
from __future__ import annotations

import dataclasses

from .parallel import Layout, Parallel, attach
from .pipeline import StepVideoPipeline
from .plan import PLAN_PROMPT, Plan, PlanningRuntime, evaluate
from .profiles import Preset, Profile


class RankPlanningRuntime(PlanningRuntime):
    def __init__(self, folder, profile: Profile, layout: Layout, assume_format: str | None = None):
        super().__init__(folder, profile, assume_format)
        self.par = Parallel.planned(layout)

    def load(self, component: str, dtype):
        model = super().load(component, dtype)
        if component == "transformer":
            attach(getattr(model, "model", model), self.par)   # the network inside the plan's Replaying wrapper
        return model


def plan_per_rank(folder, profile: Profile, preset: Preset, layout: Layout,
                  assume_format: str | None = None) -> Plan:
    """Peak device and host bytes per phase on one rank of `layout` (rank 0: it also runs the text phase and the
    decode)."""
    if layout.cfg == 2:
        profile = dataclasses.replace(profile, cfg_mode="batch")   # as ParallelRuntime runs it
    runtime = RankPlanningRuntime(folder, profile, layout, assume_format)
    pipe = StepVideoPipeline(folder, profile, progress=False, runtime=runtime)
    with runtime.accountant:
        pipe(prompt=PLAN_PROMPT, num_frames=preset.frames, height=preset.height, width=preset.width,
             num_inference_steps=1, output_type="video", seed=0)
    return evaluate(runtime.phases, profile, preset)
