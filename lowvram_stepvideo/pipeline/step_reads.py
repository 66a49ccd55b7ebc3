"""The host's reads of a denoising step, made once per step (the one host sync a step is allowed).

Two things in a step need a value from the device: the check that the step's latents are finite (the job asks for
it), and, with the step cache on, whether this step reuses (known on the device after block 0, needed by the host
before block 1 is run or fetched). `StepReads` reads every such flag in one transfer: the step cache's decision
carries the finiteness checks still pending, and a step's own check is read at its end only when nothing was read
during the step; otherwise it waits for the next read (the next step's decision, or the next step's end). So every
step makes one read, and a NaN is reported, naming its step, at most one step after it appeared and always before
anything is saved from those latents: `settle()` reads what is pending (a checkpoint's save calls it).
"""
from __future__ import annotations

from typing import Callable

import torch

OnFalse = Callable[[], None]     # called when a deferred check's flag reads False (it raises)


class StepReads:
    def __init__(self):
        self.pending: list[tuple[torch.Tensor, OnFalse]] = []
        self.reads = 0             # host reads made since the step started

    def start_step(self) -> None:
        self.reads = 0

    def read(self, flag: torch.Tensor) -> bool:
        """`flag` (a 0-d bool tensor on the device) as a Python bool, read with every pending check."""
        return self._read([flag])[0]

    def end_step(self, flag: torch.Tensor, on_false: OnFalse) -> None:
        """The step's check (`flag` False calls `on_false`): read now if nothing was read during the step, else
        with the next read."""
        self.pending.append((flag, on_false))
        if not self.reads:
            self.settle()

    def settle(self) -> None:
        """Read the pending checks now (one read; nothing when none is pending)."""
        if self.pending:
            self._read([])

    def _read(self, flags: list[torch.Tensor]) -> list[bool]:
        pending, self.pending = self.pending, []
        values = torch.stack([f.reshape(()) for f in (*flags, *(p for p, _ in pending))]).tolist()
        self.reads += 1
        for ok, (_, on_false) in zip(values[len(flags):], pending):   # the earliest failing step first
            if not ok:
                on_false()
        return values[:len(flags)]
