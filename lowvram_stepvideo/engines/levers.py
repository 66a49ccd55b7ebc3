"""The speed levers of the denoising phase, attached to the DiT from outside for one phase and reported for the
log and the sidecar: attention kernel (profile `attention`), expanded weights kept across token runs, fast
low-precision matmuls (profile `matmul`), the first-block step cache, regional compile (`SpeedOptions`) and, on a
rank of a parallel run, the CFG and sequence splits. Each is a handle of the attach registry (attach.py); `detach`
takes them all off, last first.

A real run and the memory planner choose with the same functions (attention.choose_attention,
fast_matmul.choose_matmul) for a `Target`: the device's in a run, the profile's target card in a plan. Under the
planner (fake tensors) the levers are attached as they would run on that card, so the plan counts what they
allocate (kept expansions, the step cache's residuals, the fast matmul's temporaries), with the chosen attention
kernel's data-free stand-in (attention.planned_kernel); compile changes no allocation the plan models and is left
out, and no kernel is probed. A real run probes its kernels first (probes.py: auto takes the fastest that passes) and
guards each attention call site: a kernel error mid-run that is not out-of-memory logs one warning, reruns that
call on SDPA and keeps the site on SDPA (attention_paths.Guarded; the sites are in the report).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict
from typing import Callable

import torch
from torch import nn

from . import fast_matmul, parallel, probes
from .attach import Attachments, Handle, attaching
from .attention import attach_attention, choose_attention, planned_kernel, run_function
from .target import Target
from .compile import compile_blocks
from ..defaults import SpeedOptions
from ..models.dit import TOKEN_RUN_SCOPES
from ..models.quant import QuantLinear, keep_expanded_weights
from .step_cache import FirstBlockCache


def weight_format(model: nn.Module) -> str:
    """"int8" / "fp8" when the model has quantized linears, else "bf16" (float weights)."""
    return next((m.fmt.name for m in model.modules() if isinstance(m, QuantLinear)), "bf16")


def attach_expanded_weights(model: nn.Module) -> Handle:
    """Keep each quantized linear's expanded weight for one call of its token-run scope (quant.ExpandedWeights)."""
    with attaching(model, "expanded_weights") as handle:
        engine = keep_expanded_weights(model, TOKEN_RUN_SCOPES)
        handle.on_detach(lambda discard: engine.remove())
    handle.value = engine
    return handle


class DiTLevers:
    """Attach with `attach()`, undo with `detach()`; `report()` says what ran (for the sidecar). `card`: the card
    the levers choose for (see the module docstring); `par`: this rank's place in a parallel run, or None; `log`:
    where a kernel failing mid-run is said (default: this module's logger)."""

    def __init__(self, dit: nn.Module, profile, options: SpeedOptions, device: torch.device, card: Target,
                 planning: bool = False, par=None, log: Callable[[str], None] | None = None):
        self.dit, self.profile, self.options, self.planning = dit, profile, options, planning
        self.device, self.card, self.par = torch.device(device), card, par
        self.log = log or logging.getLogger(__name__).warning
        self.cache: FirstBlockCache | None = None
        self.attached = Attachments()
        self.info: dict = {}

    def attach(self) -> "DiTLevers":
        with self.attached:
            self._attach_attention()
            self.compiled = self.options.compile and not self.planning
            # hooks inside a compiled block would be guarded per block (a recompile each): a compiled block leaves
            # repeated expansions of a weight to the compiler (attach.EXCLUSIVE)
            if not self.compiled:
                self.attached.add(attach_expanded_weights(self.dit))
            self._attach_matmul()
            if self.options.cache:
                self.cache = FirstBlockCache(self.options.cache, self.options.cache_max_reuse).attach(self.dit)
                self.attached.add(self.cache.handle)
            if self.compiled:
                self.attached.add(compile_blocks(self.dit.transformer_blocks))
            if self.par is not None:     # around the kernel chosen above (attach.ORDER)
                self.attached.add(parallel.attach(self.dit, self.par))
        return self

    def _attach_attention(self) -> None:
        if self.planning:
            kernel, why = choose_attention(self.profile, self.card)
            attend = planned_kernel(kernel, self.card.capability, self.profile.torch_dtype)
            self.attached.add(attach_attention(self.dit, attend))
            self.info["attention"], self.info["attention_reason"] = kernel, why
            return
        head_dim = next(m.head_dim for m in self.dit.modules() if hasattr(m, "attend"))
        run = probes.choose_run_attention(self.profile, self.card, self.device, head_dim)
        attend = run_function(run.kernel, run.precision)
        fallback = None if run.kernel == "sdpa" else run_function("sdpa", run.fallback_precision)
        self.attached.add(attach_attention(self.dit, attend, fallback, self._kernel_failed))
        self.info["attention"], self.info["attention_reason"] = run.kernel, run.why
        if run.precision:
            self.info["attention_precision"] = run.precision
        self.info["attention_fallbacks"] = {}

    def _kernel_failed(self, site: str, reason: str) -> None:
        """A call site's attention kernel raised mid-run: said once, every such site kept for the report."""
        if not self.info["attention_fallbacks"]:
            self.log(f"warning: attention kernel {self.info['attention']} failed in {site} ({reason}); that call "
                     "was rerun on sdpa and the call site stays on sdpa: no step is lost")
        self.info["attention_fallbacks"][site] = reason

    def _attach_matmul(self) -> None:
        fmt = weight_format(self.dit)
        use, why = fast_matmul.choose_matmul(self.profile, fmt, self.card)
        if self.planning:
            why = "planned"
        elif use and not (found := probes.probe_matmul(use, self.device, self.profile.torch_dtype)).ok:
            use, why = None, f"{why} failed its probe here ({found.reason}); using weight-only"
        self.matmul_calls = self.attached.add(fast_matmul.attach_matmul(self.dit, use, self.card.cuda)).value
        self.info["matmul"] = "weight-only" if use is None else f"{use} x {use}"
        self.info["matmul_reason"] = why

    def detach(self) -> None:
        self.attached.detach()

    def start_step(self, step: int, total_steps: int, read: Callable[[torch.Tensor], bool] | None = None) -> None:
        """Step `step` begins; `read`: how a decision made on the device reaches the host (the step cache's)."""
        if self.cache is not None:
            self.cache.start_step(step, total_steps, read)

    def branch(self, name: str):
        """Context for DiT calls of one CFG branch ("cond", "uncond" or "cond+uncond")."""
        return self.cache.branch(name) if self.cache is not None else contextlib.nullcontext()

    def summary(self) -> str:
        i = self.info
        cache = f"step cache {self.options.cache}" if self.cache else "step cache off"
        precision = f" in {i['attention_precision']}" if i.get("attention_precision") else ""
        return (f"speed: attention {i.get('attention', '?')}{precision} ({i.get('attention_reason', '')}); "
                f"matmul {i['matmul']} ({i['matmul_reason']}); {cache}; compile {'on' if self.compiled else 'off'}")

    def report(self) -> dict:
        out = dict(self.info, options=asdict(self.options), compile=self.compiled,
                   matmul_calls={"fast": self.matmul_calls[0], "weight_only": self.matmul_calls[1]})
        out["step_cache"] = self.cache.counts() if self.cache is not None else None
        return out
