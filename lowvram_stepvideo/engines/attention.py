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
cross-attention stays exact.

"auto" takes the first importable kernel of the card table's order for the card (cards.attention_order: only the
kernels that exist for its architecture; flash-attn 3 first on Hopper, SageAttention first on GeForce cards, RTX
50xx included, flash-attn 2 first elsewhere, SDPA last; no CUDA: SDPA). A GPU measurement that disagrees changes
the table, not code. The memory planner attaches the chosen kernel's data-free stand-in (`planned_kernel`): output
only for a fused kernel, the math kernel's scores where the card has no fused kernel for the dtype (bf16 on Turing).
"""
from __future__ import annotations

import functools
import importlib
import logging
from typing import Callable

import torch
from torch import nn

from ..models.layers import sdpa
from ..profiles import Profile
from .attach import Handle, attaching
from .cards import attention_order, fused_attention
from .target import Target, current_target

log = logging.getLogger(__name__)

BACKENDS = ("sdpa", "flash", "sage")        # what a profile or --attention names
KERNELS = ("sdpa", "flash3", "flash2", "sage")  # what runs (and is recorded)
INSTALL_HINT = {"flash": "pip install flash-attn", "sage": "pip install sageattention"}
_MODULES = {"flash3": [("flash_attn_interface", "flash_attn_func")], "flash2": [("flash_attn", "flash_attn_func")],
            "sage": [("sageattention", "sageattn")]}
_MODULES["flash"] = _MODULES["flash3"] + _MODULES["flash2"]


def choose_auto(card: Target, importable: Callable[[str], bool]) -> tuple[str, str]:
    """(kernel, reason) for "auto" on `card`; `importable(kernel)` says whether a kernel's package imports."""
    if card.capability is None:
        return "sdpa", f"no CUDA device ({card.name or 'cpu'})"
    order = attention_order(card.capability, card.geforce)
    kernel = next(k for k in order if k == "sdpa" or importable(k))
    why = ("Hopper: flash-attn 3 first" if card.capability[0] == 9 else
           "GeForce: int8 QK (SageAttention) first" if card.geforce else "flash-attn 2 first")
    return kernel, f"{why} ({card.name}, compute capability {card.capability[0]}.{card.capability[1]})"


@functools.cache
def _kernel(name: str) -> Callable | None:
    """The unmasked (B, S, H, D) kernel of an optional package, or None when it cannot be imported."""
    for module, attr in _MODULES[name]:
        try:
            return getattr(importlib.import_module(module), attr)
        except Exception:  # ImportError, or a broken CUDA extension failing at import
            continue
    return None


def is_available(name: str) -> bool:
    return name == "sdpa" or (name in _MODULES and _kernel(name) is not None)


def _run_kernel(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attention backend {name!r} needs CUDA fp16/bf16 tensors, got {q.device.type} {q.dtype}; "
                         "run the DiT in bf16 on a GPU or use backend 'sdpa'")
    fn = _kernel(name)
    out = fn(q, k, v, tensor_layout="NHD", is_causal=False) if name == "sage" else fn(q, k, v, causal=False)
    return out[0] if isinstance(out, tuple) else out  # flash-attn 3 may return (out, lse)


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
    """The `attend` callable that runs `kernel` (one of KERNELS)."""
    return sdpa if kernel == "sdpa" else functools.partial(attention, backend=kernel)


def math_attention(capability: tuple[int, int] | None, dtype: torch.dtype) -> bool:
    """Whether SDPA falls to its math kernel on a card of `capability` computing in `dtype` (no fused kernel takes
    it: bf16 on Turing and Volta). None: the CPU or an unknown card, planned fused."""
    return capability is not None and not fused_attention(capability, str(dtype).removeprefix("torch."))


def planned_kernel(kernel: str, capability: tuple[int, int] | None = None,
                   dtype: torch.dtype = torch.bfloat16) -> Callable:
    """What `kernel` allocates on a card of `capability` in `dtype`, without data, for the memory planner.
    flash-attn, SageAttention and SDPA's fused paths keep no (Sq, Sk) scores in memory: their output alone. SDPA
    where no fused kernel takes the dtype runs its math kernel (`math_kernel_stand_in`)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; one of {', '.join(KERNELS)}")
    return math_kernel_stand_in if kernel == "sdpa" and math_attention(capability, dtype) else output_only


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


def attach_attention(model: nn.Module, attend: Callable) -> Handle:
    """Point every attention module of `model` (those with an `attend` attribute) at `attend`; the handle's
    detach gives each its own kernel back."""
    found = [m for m in model.modules() if hasattr(m, "attend")]
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention modules with an 'attend' attribute")
    with attaching(model, "attention") as handle:
        for m in found:
            handle.set(m, "attend", attend)
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
