"""The speed levers of the denoising phase, attached to the DiT from outside for one phase and reported for the
log and the sidecar: attention kernel (profile `attention`), expanded weights kept across token runs, fast
low-precision matmuls (profile `matmul`), the first-block step cache and regional compile (`SpeedOptions`).

Under the memory planner (fake tensors) the levers that allocate are attached as they would run on the target card
(kept expansions, the step cache's residuals, the fast matmul's temporaries when the profile asks for it), so the
plan counts them; the attention kernel and compile change no allocation the plan models and are left out.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict

import torch
from torch import nn

from . import fast_matmul
from .attention import choose_backend, current_card, use_attention_backend
from .compile import compile_blocks, uncompile_blocks
from ..defaults import SpeedOptions
from ..models.dit import TOKEN_RUN_SCOPES
from ..models.quant import QuantLinear, keep_expanded_weights
from .step_cache import FirstBlockCache


def weight_format(model: nn.Module) -> str:
    """"int8" / "fp8" when the model has quantized linears, else "bf16" (float weights)."""
    return next((m.fmt.name for m in model.modules() if isinstance(m, QuantLinear)), "bf16")


class DiTLevers:
    """Attach with `attach()`, undo with `detach()`; `report()` says what ran (for the sidecar)."""

    def __init__(self, dit: nn.Module, profile, options: SpeedOptions, device: torch.device, planning: bool = False):
        self.dit, self.profile, self.options, self.planning = dit, profile, options, planning
        self.device = torch.device(device)
        self.cache: FirstBlockCache | None = None
        self.info: dict = {}

    def attach(self) -> "DiTLevers":
        if not self.planning:
            card = current_card(self.device)   # of the device this runs on, not of the machine's first one
            kernel, why = choose_backend(self.profile.attention, card, fallback=True)
            self.info["attention"] = use_attention_backend(self.dit, kernel, card=card)
            self.info["attention_reason"] = why
        self.compiled = self.options.compile and not self.planning
        # hooks inside a compiled block would be guarded per block (a recompile each): a compiled block leaves
        # repeated expansions of a weight to the compiler
        self.expanded = None if self.compiled else keep_expanded_weights(self.dit, TOKEN_RUN_SCOPES)
        self._attach_matmul()
        if self.options.cache:
            self.cache = FirstBlockCache(self.options.cache, self.options.cache_max_reuse).attach(self.dit)
        if self.compiled:
            compile_blocks(self.dit.transformer_blocks)
        return self

    def _attach_matmul(self) -> None:
        fmt, cuda = weight_format(self.dit), self.device.type == "cuda"
        if self.planning:   # plan as the target card would run: the profile's choice, if the folder allows it
            cuda = self.profile.device == "cuda"
            use = fmt if self.profile.matmul == "fast" and fmt in fast_matmul.KERNEL_TABLE and cuda else None
            why = "planned"
        else:
            capability = fast_matmul.device_capability(self.device)
            use, why = fast_matmul.choose(self.profile.matmul, fmt, self.device.type, capability)
            failed = use and fast_matmul.probe(use, self.device, self.profile.torch_dtype)
            if failed:
                use, why = None, f"{why} failed here ({failed}); using weight-only"
        self.matmul_calls = fast_matmul.use_matmul(self.dit, use, cuda)
        self.info["matmul"] = "weight-only" if use is None else f"{use} x {use}"
        self.info["matmul_reason"] = why

    def detach(self) -> None:
        if self.expanded is not None:
            self.expanded.remove()
        fast_matmul.use_matmul(self.dit, None, False)
        if self.cache is not None:
            self.cache.detach()
        if self.compiled:
            uncompile_blocks(self.dit.transformer_blocks)

    def start_step(self, step: int, total_steps: int) -> None:
        if self.cache is not None:
            self.cache.start_step(step, total_steps)

    def branch(self, name: str):
        """Context for DiT calls of one CFG branch ("cond", "uncond" or "cond+uncond")."""
        return self.cache.branch(name) if self.cache is not None else contextlib.nullcontext()

    def summary(self) -> str:
        i = self.info
        cache = f"step cache {self.options.cache}" if self.cache else "step cache off"
        return (f"speed: attention {i.get('attention', '?')} ({i.get('attention_reason', '')}); "
                f"matmul {i['matmul']} ({i['matmul_reason']}); {cache}; compile {'on' if self.compiled else 'off'}")

    def report(self) -> dict:
        out = dict(self.info, options=asdict(self.options), compile=self.compiled,
                   matmul_calls={"fast": self.matmul_calls[0], "weight_only": self.matmul_calls[1]})
        out["step_cache"] = self.cache.counts() if self.cache is not None else None
        return out
