"""Attention backends, chosen for a card (`choose_attention`: the same choice for a run and its memory plan) and
attached to a model through the registry (`attach_attention`, or `use_attention_backend(model, "sage")`).

Every backend takes q (B, Sq, H, D), k and v (B, Sk, H, D) and an optional boolean key mask (B, Sk) (True = attend;
the same keys for every query, which is all the DiT needs) and returns (B, Sq, H, D). Scale is 1/sqrt(D).
- "sdpa":  torch.nn.functional.scaled_dot_product_attention (default; any device and dtype).
- "flash": flash-attn 3 (`flash_attn_interface`, Hopper only) or 2 (`flash_attn`); CUDA, fp16/bf16. The kernel
           actually used is reported as "flash3" or "flash2".
- "sage":  SageAttention (`sageattention.sageattn`, int8 QK); CUDA, fp16/bf16.
flash takes no mask: a masked call runs it per batch element over the selected keys, which is exact. A masked call
to sage (the DiT's cross-attention over a few hundred text tokens: little of the cost) runs SDPA, so the masked
cross-attention stays exact. The optional kernels come from `SOURCES` (name -> KernelSource: where the function is
imported from and how it is called); a test puts a fake there to run the choice, the probe and the fallback on the
CPU.

"auto" takes the first importable kernel of the card table's order for the card (cards.attention_order: only the
kernels that exist for its architecture; flash-attn 3 first on Hopper, SageAttention first on GeForce cards, RTX
50xx included, flash-attn 2 first elsewhere, SDPA last; no CUDA: SDPA): what the memory plan and the time estimate
assume. A real run probes and times that order's kernels on its card (engines/probes.py) and takes the fastest
that passes; a measured order that disagrees with the table is a reason to change the table.

Precision (`attention_precision`): where the card has a fused kernel for float16 but none for the compute dtype
(bf16 on Turing and Volta), the kernel runs on float16 copies of q, k, v (attention_paths.HalfPrecision; v
scaled by a power of two on the device, so any range fits). The memory planner attaches the chosen kernel's
data-free stand-in (`planned_kernel`): output only for a fused kernel (with the float16 copies where those are
made), the math kernel's scores where no fused kernel takes the inputs at all.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
from typing import Callable

import torch
from torch import nn

from ..models.layers import sdpa
from ..profiles import Profile
from .attach import Handle, attaching
from .attention_paths import Guarded, HalfPrecision, exact_attention
from .cards import attention_order, fused_attention
from .target import Target, current_target

log = logging.getLogger(__name__)

BACKENDS = ("sdpa", "flash", "sage")        # what a profile or --attention names
KERNELS = ("sdpa", "flash3", "flash2", "sage")  # what runs (and is recorded)
INSTALL_HINT = {"flash": "pip install flash-attn", "sage": "pip install sageattention"}
PRECISIONS = (None, "float16", "float32")   # attention_precision: as given, float16 copies, exact float32


class KernelSource:
    """An optional kernel: (module, function) pairs tried in turn at first use, the keyword arguments of a call on
    (B, S, H, D) tensors, and the distributions whose version identifies the build (the probe cache's key).
    `needs_cuda`: refuse tensors other than CUDA fp16/bf16 before calling (a test's fake on the CPU says False)."""

    needs_cuda = True

    def __init__(self, modules: list[tuple[str, str]], packages: tuple[str, ...], **call_kwargs):
        self.modules, self.packages, self.call_kwargs = modules, packages, call_kwargs

    @functools.cached_property
    def function(self) -> Callable | None:
        """The kernel, or None when it cannot be imported."""
        for module, attr in self.modules:
            try:
                return getattr(importlib.import_module(module), attr)
            except Exception:  # ImportError, or a broken CUDA extension failing at import
                continue
        return None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self.function(q, k, v, **self.call_kwargs)
        return out[0] if isinstance(out, tuple) else out  # flash-attn 3 may return (out, lse)

    def version(self) -> str:
        for package in self.packages:
            try:
                return f"{package} {importlib.metadata.version(package)}"
            except importlib.metadata.PackageNotFoundError:
                continue
        return "version unknown"


SOURCES: dict[str, KernelSource] = {
    "flash3": KernelSource([("flash_attn_interface", "flash_attn_func")], ("flash-attn-3", "flash_attn_3"),
                           causal=False),
    "flash2": KernelSource([("flash_attn", "flash_attn_func")], ("flash-attn", "flash_attn"), causal=False),
    "sage": KernelSource([("sageattention", "sageattn")], ("sageattention",), tensor_layout="NHD",
                         is_causal=False),
}


def choose_auto(card: Target, importable: Callable[[str], bool]) -> tuple[str, str]:
    """(kernel, reason) for "auto" on `card`; `importable(kernel)` says whether a kernel's package imports."""
    if card.capability is None:
        return "sdpa", f"no CUDA device ({card.name or 'cpu'})"
    order = attention_order(card.capability, card.geforce)
    kernel = next(k for k in order if k == "sdpa" or importable(k))
    why = ("no flash-attn or SageAttention kernel for this architecture" if order == ("sdpa",) else
           "Hopper: flash-attn 3 first" if card.capability[0] == 9 else
           "GeForce: int8 QK (SageAttention) first" if card.geforce else "flash-attn 2 first")
    return kernel, f"{why} ({card.name}, compute capability {card.capability[0]}.{card.capability[1]})"


def _kernel(name: str) -> Callable | None:
    """The unmasked (B, S, H, D) kernel `name` (of SOURCES; "flash": flash-attn 3, else 2), or None when it cannot
    be imported."""
    if name == "flash":
        return _kernel("flash3") or _kernel("flash2")
    return SOURCES[name].function if name in SOURCES else None


def is_available(name: str) -> bool:
    return name == "sdpa" or _kernel(name) is not None


def kernel_version(name: str) -> str:
    """What identifies kernel `name`'s build: its distribution's version (torch's for SDPA)."""
    return f"torch {torch.__version__}" if name == "sdpa" else SOURCES[name].version()


def _run_kernel(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    source = SOURCES[name]
    if source.needs_cuda and (not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16)):
        raise ValueError(f"attention backend {name!r} needs CUDA fp16/bf16 tensors, got {q.device.type} {q.dtype}; "
                         "run the DiT in bf16 on a GPU or use backend 'sdpa'")
    return source(q, k, v)


def _masked_kernel(name: str, q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """Keys are masked the same for every query, so attending over only the kept keys is exact. The DiT's key
    masks (models.dit.key_mask, built once per denoising phase) keep the first n keys of each row and carry those
    counts as host ints: each row's keys are a slice, and nothing is read back from the device (no sync). Any
    other mask selects each row's keys by boolean indexing, which reads the mask back at every call."""
    lengths = getattr(mask, "kv_lengths", None)
    if lengths is not None and len(lengths) == q.shape[0]:
        return torch.cat([_run_kernel(name, q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n])
                          for b, n in enumerate(lengths)], dim=0)  # (B, Sq, H, D)
    outs = []
    for b in range(q.shape[0]):
        keep = mask[b]  # (Sk,) bool
        outs.append(_run_kernel(name, q[b:b + 1], k[b:b + 1, keep], v[b:b + 1, keep]))
    return torch.cat(outs, dim=0)  # (B, Sq, H, D)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              backend: str = "sdpa") -> torch.Tensor:
    """q (B, Sq, H, D), k/v (B, Sk, H, D), mask (B, Sk) bool or None -> (B, Sq, H, D). `backend`: a name of
    BACKENDS or KERNELS."""
    if backend == "sdpa" or (backend == "sage" and mask is not None):   # masked: exact SDPA (see module doc)
        return sdpa(q, k, v, mask)
    check_backend(backend)
    if mask is None:
        return _run_kernel(backend, q, k, v)
    return _masked_kernel(backend, q, k, v, mask)


def _family(kernel: str) -> str:
    return "flash" if kernel.startswith("flash") else kernel


def check_backend(name: str) -> None:
    if name not in BACKENDS and name not in KERNELS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if not is_available(name):
        raise ValueError(f"attention backend {name!r} is not importable here; install it "
                         f"({INSTALL_HINT[_family(name)]}) or use 'sdpa'")


def choose_backend(name: str, card: Target, fallback: bool = False) -> tuple[str, str]:
    """(kernel of KERNELS, why) for a profile's `attention` value on `card`. An explicit backend that is not
    importable is an error, or with `fallback` becomes 'sdpa' (see `fell_back`)."""
    if name == "auto":
        return choose_auto(card, is_available)
    if name not in BACKENDS:
        check_backend(name)
    kernel = name
    if name == "flash":   # flash-attn 3 runs on Hopper only
        kernel = "flash3" if card.capability and card.capability[0] == 9 and is_available("flash3") else "flash2"
    if fallback and not is_available(kernel):
        return "sdpa", f"{name!r} not importable"
    if not is_available(kernel):
        check_backend(name)
        check_backend(kernel)
    return kernel, "as configured"


def choose_attention(profile: Profile, card: Target) -> tuple[str, str]:
    """The attention kernel a run of `profile` uses on `card`, and why: the one choice of a real run (its device's
    card) and of the memory plan (the profile's target card). A backend that is not importable falls back to
    'sdpa'."""
    return choose_backend(profile.attention, card, fallback=True)


def fell_back(name: str, kernel: str) -> bool:
    """Whether backend `name` became 'sdpa' because its package is not importable."""
    return name in INSTALL_HINT and kernel == "sdpa"


def warn_fallback(name: str) -> None:
    log.warning("attention backend %r is not importable (%s); using 'sdpa'", name, INSTALL_HINT[name])


def kernel_function(kernel: str) -> Callable:
    """The `attend` callable that runs `kernel` (one of KERNELS) in the dtype it is given."""
    return sdpa if kernel == "sdpa" else functools.partial(attention, backend=kernel)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def attention_precision(capability: tuple[int, int] | None, dtype: torch.dtype) -> str | None:
    """"float16" where a card of `capability` has a fused attention kernel for float16 and none for `dtype` (bf16
    on Turing and Volta): the kernel runs on float16 copies there. None: in `dtype` itself (the CPU too)."""
    if capability is None or fused_attention(capability, _dtype_name(dtype)):
        return None
    return "float16" if fused_attention(capability, "float16") else None


def run_function(kernel: str, precision: str | None = None) -> Callable:
    """The `attend` callable of `kernel` at `precision` (PRECISIONS: as given; on float16 copies; "float32": the
    exact path, whatever the kernel)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown attention precision {precision!r}")
    if precision == "float32":
        return exact_attention
    return HalfPrecision(kernel_function(kernel)) if precision == "float16" else kernel_function(kernel)


def math_attention(capability: tuple[int, int] | None, dtype: torch.dtype) -> bool:
    """Whether SDPA falls to its math kernel on a card of `capability` computing in `dtype`: no fused kernel takes
    `dtype` and it is not run in float16 either (attention_precision). None: the CPU or an unknown card, planned
    fused."""
    return (capability is not None and not fused_attention(capability, _dtype_name(dtype))
            and attention_precision(capability, dtype) is None)


def planned_kernel(kernel: str, capability: tuple[int, int] | None = None,
                   dtype: torch.dtype = torch.bfloat16) -> Callable:
    """What `kernel` allocates on a card of `capability` in `dtype`, without data, for the memory planner.
    flash-attn, SageAttention and SDPA's fused paths keep no (Sq, Sk) scores in memory: their output alone, plus
    the float16 copies of q, k, v where the kernel runs on them (`HALF_OUTPUT_ONLY`). SDPA where no fused kernel
    takes the inputs runs its math kernel (`math_kernel_stand_in`)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; one of {', '.join(KERNELS)}")
    if kernel == "sdpa" and math_attention(capability, dtype):
        return math_kernel_stand_in
    return HALF_OUTPUT_ONLY if attention_precision(capability, dtype) == "float16" else output_only


def math_kernel_stand_in(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """What SDPA runs where no fused kernel takes the inputs: its math kernel, step by step as
    aten/src/ATen/native/transformers/attention.cpp writes it (the op itself reaches the planner whole under
    inference mode): half inputs upcast to float32, q and k scaled, the (B, H, Sq, Sk) scores, the key mask added,
    their softmax (both alive at once), P @ V, and the weights copied back to the input dtype (the kernel returns
    them too). q (B, Sq, H, D), k/v (B, Sk, H, D), mask (B, Sk) bool -> (B, Sq, H, D)."""
    dtype = q.dtype
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))                    # (B, H, S, D)
    if dtype in (torch.float16, torch.bfloat16):
        q, k, v = (t.float() for t in (q, k, v))
    scale = q.shape[-1] ** -0.25
    scores = torch.matmul(q * scale, k.transpose(-2, -1) * scale)       # (B, H, Sq, Sk)
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=scores.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        scores.add_(bias[:, None, None, :])
    weights = torch.softmax(scores, dim=-1)
    del scores
    out, _ = torch.matmul(weights, v), weights.to(dtype)
    return out.to(dtype).transpose(1, 2)


def output_only(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """q (B, Sq, H, D) -> an output of the same shape, nothing computed."""
    return torch.empty_like(q)


HALF_OUTPUT_ONLY = HalfPrecision(output_only)   # float16 copies of q, k, v (v scaled), the output cast back


def attach_attention(model: nn.Module, attend: Callable, fallback: Callable | None = None,
                     on_fail: Callable[[str, str], None] | None = None) -> Handle:
    """Point every attention module of `model` (those with an `attend` attribute) at `attend`; with a `fallback`,
    each at its own attention_paths.Guarded(attend, fallback, its name, on_fail): a kernel error at one call site
    reruns that call on `fallback` and keeps the site on it. The handle's detach gives each its own kernel back."""
    found = [(name, m) for name, m in model.named_modules() if hasattr(m, "attend")]
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention modules with an 'attend' attribute")
    with attaching(model, "attention") as handle:
        for name, m in found:
            kernel = attend if fallback is None else Guarded(attend, fallback, name, on_fail or (lambda *a: None))
            handle.set(m, "attend", kernel)
    return handle


def use_attention_backend(model: nn.Module, name: str, fallback: bool = False, card: Target | None = None) -> Handle:
    """Attach backend `name` (a profile's value, "auto" included) on `card` (default: this machine's first
    device) to `model`'s attention modules; the handle's `value` is the kernel used (one of KERNELS)."""
    kernel, _ = choose_backend(name, card or current_target(), fallback)
    if fell_back(name, kernel):
        warn_fallback(name)
    handle = attach_attention(model, kernel_function(kernel))
    handle.value = kernel
    return handle
