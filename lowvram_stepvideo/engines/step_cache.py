"""First-block residual cache for the DiT (opt-in: `--step-cache THRESHOLD`), attached from outside (attach.py).

Each DiT forward runs block 0, then compares block 0's residual (its output minus its input) with the one saved at
the last full evaluation of the same CFG branch: relative change = mean|r - r_saved| / mean|r_saved|. Below the
threshold, blocks 1..N-1 are not run (nor, under block streaming, fetched: their hooks never fire) and the output
is block 0's output plus the residual those blocks added at the last full evaluation. Otherwise all blocks run and
both residuals are saved. The first step and the last step always run in full, and at most `max_reuse` forwards in
a row reuse. State is kept per branch ("cond", "uncond", or "cond+uncond" for CFG as a batch of 2); each branch
holds two (B, S, D) tensors in the compute dtype on the device.

A step's reuse is decided once, by its first forward that can reuse, and holds for every branch of the step: CFG as a
batch decides both halves together from their joint change; CFG one branch after the other decides from the cond
branch's change, and the uncond branch follows. The decision is made on the device and read by the host once (the
`read` start_step is given: the denoising loop's, which carries the step's other checks in the same read), so a step
with the cache makes one host read, as one without it does.

Quality: a threshold trades evaluations for error. The numbers in BENCHMARKS.md come from the tiny random-weight
models, whose blocks change little between steps in a way real weights need not; they show the mechanism works, not
what quality a threshold gives on the real model. Resuming a cached run starts with empty state (a full evaluation),
so a resumed run can differ slightly from an uninterrupted one.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .attach import attaching


@dataclass
class BranchState:
    first_residual: torch.Tensor | None = None   # block 0's residual at the last full evaluation
    rest_residual: torch.Tensor | None = None    # what blocks 1..N-1 added then
    reused_in_a_row: int = 0
    full: int = 0
    cached: int = 0


@dataclass
class FirstBlockCache:
    threshold: float
    max_reuse: int = 2
    branches: dict[str, BranchState] = field(default_factory=dict)
    step: int = 0
    total_steps: int = 1
    branch_name: str = "cond+uncond"
    decisions: int = 0           # steps whose reuse was decided from the data: one read from the device each
    step_reuses: bool | None = None   # this step's decision, once made
    read: Callable[[torch.Tensor], bool] = bool   # a 0-d bool on the device -> the host's bool

    def attach(self, dit: nn.Module) -> "FirstBlockCache":
        if not self.threshold > 0:
            raise ValueError(f"step cache threshold must be > 0, got {self.threshold!r}")
        if self.max_reuse < 1:
            raise ValueError(f"step cache max_reuse must be >= 1, got {self.max_reuse!r}")
        self.dit = dit
        with attaching(dit, "step_cache") as handle:
            handle.set(dit, "forward_blocks", self._forward_blocks)   # over the model's plain loop
            handle.on_detach(lambda discard: self.branches.clear())
        self.handle = handle
        return self

    def detach(self) -> None:
        self.handle.detach()

    def start_step(self, step: int, total_steps: int, read: Callable[[torch.Tensor], bool] | None = None) -> None:
        """Step `step` of `total_steps` begins; `read` turns its decision into a host bool (default: bool())."""
        self.step, self.total_steps, self.step_reuses = step, total_steps, None
        self.read = read or bool

    @contextlib.contextmanager
    def branch(self, name: str):
        """DiT calls inside are the CFG branch `name`."""
        before, self.branch_name = self.branch_name, name
        try:
            yield
        finally:
            self.branch_name = before

    def _forward_blocks(self, handed: list[torch.Tensor], *args) -> torch.Tensor:
        blocks = self.dit.transformer_blocks
        h = handed.pop()           # see StepVideoModel.forward_blocks
        first = blocks[0](h, *args)
        residual = first.sub(h)
        del h
        state = self.branches.setdefault(self.branch_name, BranchState())
        if self._can_reuse(state, residual):
            state.reused_in_a_row += 1
            state.cached += 1
            return first.add_(state.rest_residual)
        out = first
        for block in blocks[1:]:
            out = block(out, *args)
        state.first_residual, state.rest_residual = residual, out - first
        state.reused_in_a_row = 0
        state.full += 1
        return out

    def _can_reuse(self, state: BranchState, residual: torch.Tensor) -> bool:
        edge = self.step == 0 or self.step >= self.total_steps - 1
        if edge or state.first_residual is None or state.reused_in_a_row >= self.max_reuse:
            return False
        if state.first_residual.shape != residual.shape:
            return False
        if self.step_reuses is None:
            self.decisions += 1
            change = relative_change(residual, state.first_residual).double()   # float64: the threshold exactly
            self.step_reuses = self.read(change < self.threshold)   # the one read back from the device
        return self.step_reuses

    def counts(self) -> dict:
        full = sum(s.full for s in self.branches.values())
        cached = sum(s.cached for s in self.branches.values())
        return {"threshold": self.threshold, "max_reuse": self.max_reuse, "full": full, "cached": cached,
                "branches": {k: {"full": s.full, "cached": s.cached} for k, s in self.branches.items()}}


def relative_change(now: torch.Tensor, before: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """mean|now - before| / mean|before| in float32, over `rows` tokens at a time (no full-size float32 copy): a
    0-d tensor on the device, so the comparison with the threshold is made there too."""
    a, b = now.reshape(-1, now.shape[-1]), before.reshape(-1, before.shape[-1])
    diff = total = torch.zeros((), dtype=torch.float32, device=now.device)
    for r in range(0, a.shape[0], rows):
        x, y = a[r:r + rows].float(), b[r:r + rows].float()
        diff = diff + (x - y).abs().sum()
        total = total + y.abs().sum()
    return diff / total.clamp_min(1e-12)
