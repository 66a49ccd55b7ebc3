"""The machine runtime of one rank of a CFG or sequence parallel run (torchrun): the device runtime whose speed
levers attach the parallel engines too, around the kernel they chose (levers.DiTLevers)."""
from __future__ import annotations

import dataclasses

from torch import nn

from ..engines.levers import DiTLevers, SpeedOptions
from ..engines.parallel import Parallel, ParallelError
from ..profiles import Profile
from .machine import DeviceRuntime


class ParallelRuntime(DeviceRuntime):
    """A DeviceRuntime on this rank's device whose DiT runs per the layout. With CFG parallel the guided pair is
    always one batch of 2 (each rank runs its half), whatever profile is set."""

    def __init__(self, folder, profile: Profile, par: Parallel, log=None):
        self.par = par
        super().__init__(folder, profile, par.device, log)

    @property
    def profile(self) -> Profile:
        return self._profile

    @profile.setter
    def profile(self, profile: Profile) -> None:
        if self.par.layout.cfg == 2 and profile.cfg_mode != "batch":
            profile = dataclasses.replace(profile, cfg_mode="batch")
        self._profile = profile

    def attach_levers(self, dit: nn.Module, options: SpeedOptions, said: bool = False) -> DiTLevers:
        """The speed levers with this rank's parallel engines (see DeviceRuntime.attach_levers)."""
        if options.cache and self.par.layout.sequence > 1:
            raise ParallelError("the step cache (--step-cache) does not go with sequence parallel yet (each rank would "
                                "decide on its own tokens); use --parallel cfg or drop --step-cache")
        return super().attach_levers(dit, options, said)
