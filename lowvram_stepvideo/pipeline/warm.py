"""The DiT kept warm between videos: a batch, the web page and an API session run many videos with the same DiT,
and loading it (and on a GPU packing its blocks into page-locked RAM: tens of GB copied) for each one costs more
than a short video's denoising. `KeptDiT` keeps the loaded DiT after its denoising phase, parked (engines/placement.py
`park`: nothing on the device, its packed host copy and arenas kept), and hands it to the next video's denoising,
which only puts it back on the device. It is kept only when the memory plan says RAM holds it beside every other
phase (run/warm.py decides per video and sets `allowed`; the plan counts it: planning/plan.py `kept_dit_bytes`),
and only for the same weights, compute dtype, device and placement settings (`key`): anything else drops it first.
"""
from __future__ import annotations

import time

from torch import nn

from ..engines.placement import offload_component, park, unpark


class KeptDiT:
    """One DiT kept between the videos of one owner (a job queue, an API pipeline); see the module docstring.
    `placements`: (seconds from asking for the DiT to having it on the device, whether it was kept) per video."""

    def __init__(self):
        self.allowed = False        # the plan of the current video says RAM holds the DiT kept
        self.stays_bytes = 0        # what that plan counts for it while it is kept
        self.said: bool | None = None
        self.model: nn.Module | None = None
        self.key: tuple | None = None
        self.parked = False
        self.placements: list[tuple[float, bool]] = []
        self._asked = 0.0

    def take(self, key: tuple) -> nn.Module | None:
        """The kept DiT for `key`, or None (one kept for another key is dropped first); starts the placement clock."""
        self._asked = time.perf_counter()
        if self.model is not None and self.key == key:
            return self.model
        self.drop()
        return None

    def loaded(self, model: nn.Module, key: tuple) -> None:
        """`model` was loaded for `key`: the one to keep after its denoising, if allowed."""
        self.model, self.key, self.parked = model, key, False

    def unpark(self, model: nn.Module, device) -> bool:
        """Put the kept `model` on the device again; False when it is not a parked kept model (place it afresh)."""
        if model is not self.model or not self.parked:
            return False
        try:
            unpark(model, device)
        except BaseException:
            self.drop()            # half on the device (e.g. out of memory): not worth keeping
            raise
        self.parked = False
        return True

    def placed(self, kept: bool) -> float:
        """Record a placement that just ended; its seconds."""
        seconds = time.perf_counter() - self._asked
        self.placements.append((seconds, kept))
        return seconds

    def keep(self, model: nn.Module) -> bool:
        """Park `model` for the next video when it is the DiT to keep and the plan allows; False: the caller throws
        it away as usual (and it is forgotten here)."""
        if model is not self.model:
            return False
        if not self.allowed:
            self.model = self.key = None
            return False
        park(model)
        self.parked = True
        return True

    def held_bytes(self) -> int:
        """RAM the kept DiT holds now, as its plan counted it (0 when none is kept)."""
        return self.stays_bytes if self.model is not None and self.parked else 0

    def drop(self) -> None:
        """Throw the kept DiT away (its arenas and copies freed)."""
        if self.model is not None:
            offload_component(self.model, discard=True)
        self.model = self.key = None
        self.parked = False
